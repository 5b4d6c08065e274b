/*
 * tf_syscall: a user's own check of the trap flag across a syscall. getppid() is made
 * with TF set right before `syscall`; the kernel must return by IRET (SYSRET would trap
 * at once), and the CPU then traps after one user instruction. The SIGTRAP handler
 * prints "trapped" and ends the program: no need to clear TF and go on.
 */
#include <signal.h>
#include <unistd.h>

static void trapped(int sig)
{
    (void)sig;
    write(1, "trapped\n", 8);
    _exit(0);
}

int main(void)
{
    signal(SIGTRAP, trapped);
    __asm__ volatile(
        "pushfq\n\t"
        "orq $0x100, (%%rsp)\n\t"
        "movl $110, %%eax\n\t"
        "popfq\n"
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "syscall\n\t"
        "nop"
        :
        :
        : "rax", "rcx", "r11", "memory", "cc");
    write(1, "no trap\n", 8);
    return 1;
}
