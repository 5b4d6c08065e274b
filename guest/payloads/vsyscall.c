/*
 * vsyscall: call the legacy vsyscall gettimeofday at 0xffffffffff600000 (the fixed
 * vsyscall page; the kernel emulates it from the page fault when booted
 * vsyscall=xonly or vsyscall=emulate, and the caller dies of SIGSEGV with
 * vsyscall=none). Prints "<result> <seconds>".
 */
#include <stdio.h>
#include <sys/time.h>

typedef long (*vgettimeofday_t)(struct timeval *, void *);

int main(void)
{
    struct timeval tv = {0, 0};
    long ret = ((vgettimeofday_t)0xffffffffff600000UL)(&tv, NULL);

    printf("%ld %ld\n", ret, (long)tv.tv_sec);
    return 0;
}
