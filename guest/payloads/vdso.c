/*
 * vdso FUNC [N]: call FUNC (clock_gettime, gettimeofday, time or getcpu) N times
 * (default 3) through the C library, which uses the vDSO (musl: __vdso_clock_gettime,
 * __vdso_getcpu), then make the same syscall once more, raw, at sirl_syscall_insn.
 * Prints "<FUNC> <syscall nr> <raw result>". A debugger counting this process's
 * syscalls of that number sees 1 where the vDSO served the calls, N + 1 where it fell
 * back to the syscall (a clocksource the vDSO cannot read, e.g. jiffies).
 */
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "sirl.h"

int main(int argc, char **argv)
{
    const char *func = argc > 1 ? argv[1] : "clock_gettime";
    long n = sirl_arg(argc, argv, 2, 3), nr, ret;
    struct timespec ts;
    struct timeval tv;
    unsigned cpu = 0, node = 0;

    for (long i = 0; i < n; i++) {
        if (!strcmp(func, "gettimeofday"))
            gettimeofday(&tv, NULL);
        else if (!strcmp(func, "time"))
            time(NULL);
        else if (!strcmp(func, "getcpu"))
            sched_getcpu();
        else
            clock_gettime(CLOCK_MONOTONIC, &ts);
    }
    if (!strcmp(func, "gettimeofday")) {
        nr = 96;
        ret = sirl_syscall6(nr, (long)&tv, 0, 0, 0, 0, 0);
    } else if (!strcmp(func, "time")) {
        nr = 201;
        ret = sirl_syscall6(nr, 0, 0, 0, 0, 0, 0);
    } else if (!strcmp(func, "getcpu")) {
        nr = 309;
        ret = sirl_syscall6(nr, (long)&cpu, (long)&node, 0, 0, 0, 0);
    } else {
        nr = 228;
        ret = sirl_syscall6(nr, CLOCK_MONOTONIC, (long)&ts, 0, 0, 0, 0);
    }
    printf("%s %ld %ld\n", func, nr, ret);
    return 0;
}
