/*
 * Shared by the guest payloads: one raw `syscall` instruction per program, labelled
 * `sirl_syscall_insn` so the host can break on it by name (payloads are static,
 * non-PIE musl binaries: the label's address in the ELF is its address in the guest).
 * noinline keeps a single copy of the instruction, hence a single label.
 */
#ifndef SIRL_H
#define SIRL_H

#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline, unused))
static long sirl_syscall6(long nr, long a0, long a1, long a2, long a3, long a4, long a5)
{
    register long r10 __asm__("r10") = a3;
    register long r8 __asm__("r8") = a4;
    register long r9 __asm__("r9") = a5;
    long ret;

    __asm__ volatile(
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "syscall"
        : "=a"(ret)
        : "a"(nr), "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8), "r"(r9)
        : "rcx", "r11", "memory");
    return ret;
}

__attribute__((unused))
static long sirl_arg(int argc, char **argv, int i, long fallback)
{
    return argc > i ? strtol(argv[i], NULL, 0) : fallback;
}

#endif
