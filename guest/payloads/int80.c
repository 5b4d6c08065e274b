/*
 * int80 NR [ARG...]: a 64-bit process makes the 32-bit syscall NR (i386 numbers) with
 * `int $0x80` (ebx, ecx, edx, esi, edi, ebp: up to six arguments, 32 bits each), and
 * prints what came back in rax (all 64 bits: a 64-bit caller gets the kernel's whole return value). The instruction is labelled sirl_syscall_insn.
 * r8..r15, which the 32-bit ABI does not know, hold 0x8888888888888888 .. 0xffffffffffffffff
 * (the register number as every hex digit) across it: the kernel must give them back.
 */
#include "sirl.h"

int main(int argc, char **argv)
{
    long nr = sirl_arg(argc, argv, 1, 20 /* getpid */);
    long a0 = sirl_arg(argc, argv, 2, 0), a1 = sirl_arg(argc, argv, 3, 0), a2 = sirl_arg(argc, argv, 4, 0);
    long a3 = sirl_arg(argc, argv, 5, 0), a4 = sirl_arg(argc, argv, 6, 0), a5 = sirl_arg(argc, argv, 7, 0);
    long ret;

    __asm__ volatile(
        "pushq %%rbp\n\t"
        "movq %[a5], %%rbp\n\t"
        "movabsq $0x8888888888888888, %%r8\n\t"
        "movabsq $0x9999999999999999, %%r9\n\t"
        "movabsq $0xaaaaaaaaaaaaaaaa, %%r10\n\t"
        "movabsq $0xbbbbbbbbbbbbbbbb, %%r11\n\t"
        "movabsq $0xcccccccccccccccc, %%r12\n\t"
        "movabsq $0xdddddddddddddddd, %%r13\n\t"
        "movabsq $0xeeeeeeeeeeeeeeee, %%r14\n\t"
        "movabsq $0xffffffffffffffff, %%r15\n"
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "int $0x80\n\t"
        "popq %%rbp"
        : "=a"(ret)
        : "a"(nr), "b"(a0), "c"(a1), "d"(a2), "S"(a3), "D"(a4), [a5] "r"(a5)
        : "memory", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15");
    printf("%ld\n", ret);
    return 0;
}
