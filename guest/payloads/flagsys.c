/*
 * flagsys [FLAGS]: set RFLAGS bits from user mode (default CF PF AF ZF SF DF OF NT AC ID,
 * every bit ring 3 may set), then make one raw getppid() syscall, so the trace can show
 * SYSCALL masking them on entry (RFLAGS & FMASK == 0) while R11 keeps them, and SYSRET
 * restoring them from R11. Prints the RFLAGS value it read back after the syscall.
 */
#include "sirl.h"

#define USER_SETTABLE 0x244cd5UL /* CF|PF|AF|ZF|SF|DF|OF|NT|AC|ID */

int main(int argc, char **argv)
{
    unsigned long want = argc > 1 ? strtoul(argv[1], NULL, 0) : USER_SETTABLE;
    unsigned long after;
    long ret;

    __asm__ volatile(
        "pushfq\n\t"
        "orq %[want], (%%rsp)\n\t"
        "popfq\n\t"
        "movl $110, %%eax\n\t"
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "syscall\n\t"
        "pushfq\n\t"
        "popq %[after]\n\t"
        "pushq $0x202\n\t" /* back to a clean RFLAGS before any C code runs */
        "popfq"
        : "=a"(ret), [after] "=&r"(after)
        : [want] "r"(want)
        : "rcx", "r11", "memory", "cc");
    printf("%#lx %ld\n", after, ret);
    return 0;
}
