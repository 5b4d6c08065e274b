/*
 * regsys NR BX BP R12 R13 R14 R15 DI SI DX R10 R8 R9: one raw syscall with twelve general
 * registers (the callee-saved ones and the six argument registers) loaded from the
 * command line (strtoul syntax, all 64 bits), so the host can tell each register's
 * value apart in pt_regs, in the CPU while the kernel runs, and back in user mode.
 * Prints RAX afterwards, then the twelve registers as user mode found them after the
 * syscall, in the same order.
 *
 * The callee-saved registers are saved on the stack around the syscall (below the red
 * zone), so the compiler never sees them change.
 */
#include "sirl.h"

int main(int argc, char **argv)
{
    long in[12], out[12];

    if (argc != 14) {
        fprintf(stderr, "usage: regsys NR BX BP R12 R13 R14 R15 DI SI DX R10 R8 R9\n");
        return 2;
    }
    for (int i = 0; i < 12; i++)
        in[i] = (long)strtoul(argv[i + 2], NULL, 0);
    long rax = strtol(argv[1], NULL, 0), *pin = in, *pout = out;

    __asm__ volatile(
        "sub $128, %%rsp\n\t"  /* leave the red zone alone */
        "push %%rbx\n\tpush %%rbp\n\tpush %%r12\n\tpush %%r13\n\tpush %%r14\n\tpush %%r15\n\t"
        "push %%rdx\n\t"       /* out */
        "mov 0(%%rcx), %%rbx\n\tmov 8(%%rcx), %%rbp\n\tmov 16(%%rcx), %%r12\n\t"
        "mov 24(%%rcx), %%r13\n\tmov 32(%%rcx), %%r14\n\tmov 40(%%rcx), %%r15\n\t"
        "mov 48(%%rcx), %%rdi\n\tmov 56(%%rcx), %%rsi\n\tmov 64(%%rcx), %%rdx\n\t"
        "mov 72(%%rcx), %%r10\n\tmov 80(%%rcx), %%r8\n\tmov 88(%%rcx), %%r9\n\t"
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "syscall\n\t"
        "mov (%%rsp), %%rcx\n\t"  /* out */
        "mov %%rbx, 0(%%rcx)\n\tmov %%rbp, 8(%%rcx)\n\tmov %%r12, 16(%%rcx)\n\t"
        "mov %%r13, 24(%%rcx)\n\tmov %%r14, 32(%%rcx)\n\tmov %%r15, 40(%%rcx)\n\t"
        "mov %%rdi, 48(%%rcx)\n\tmov %%rsi, 56(%%rcx)\n\tmov %%rdx, 64(%%rcx)\n\t"
        "mov %%r10, 72(%%rcx)\n\tmov %%r8, 80(%%rcx)\n\tmov %%r9, 88(%%rcx)\n\t"
        "pop %%rdx\n\t"
        "pop %%r15\n\tpop %%r14\n\tpop %%r13\n\tpop %%r12\n\tpop %%rbp\n\tpop %%rbx\n\t"
        "add $128, %%rsp"
        : "+a"(rax), "+c"(pin), "+d"(pout)
        :
        : "rdi", "rsi", "r8", "r9", "r10", "r11", "memory");

    printf("%ld\n", rax);
    for (int i = 0; i < 12; i++)
        printf("%#lx\n", (unsigned long)out[i]);
    return 0;
}
