/*
 * tf_syscall: getppid() made with the trap flag set right before `syscall`. SYSCALL
 * clears TF (MSR_SYSCALL_MASK) for the kernel, which must then return by IRET: SYSRET
 * would restore TF and trap at once. Back in user mode the CPU runs one instruction
 * and raises the single-step trap; the SIGTRAP handler clears TF and counts it.
 * Prints "<traps> <getppid result>".
 */
#define _GNU_SOURCE /* REG_* of ucontext_t */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

static volatile int traps;

static void on_trap(int sig, siginfo_t *info, void *context)
{
    ucontext_t *uc = context;
    (void)sig;
    (void)info;
    traps++;
    uc->uc_mcontext.gregs[REG_EFL] &= ~0x100L;
}

int main(void)
{
    struct sigaction sa;
    long ret;

    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &sa, NULL);
    __asm__ volatile(
        "pushfq\n\t"
        "orq $0x100, (%%rsp)\n\t"
        "movl $110, %%eax\n\t"
        "popfq\n"
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "syscall\n\t"
        "nop"
        : "=a"(ret)
        :
        : "rcx", "r11", "memory", "cc");
    printf("%d %ld\n", traps, ret);
    return 0;
}
