/*
 * my_int80: a 64-bit program asks for getpid() the 32-bit way, `int $0x80` with i386
 * number 20 in eax; prints what eax held afterwards.
 */
#include <stdio.h>

int main(void)
{
    int ret;

    __asm__ volatile(
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "int $0x80"
        : "=a"(ret)
        : "a"(20)
        : "memory", "r8", "r9", "r10", "r11");
    printf("%d\n", ret);
    return 0;
}
