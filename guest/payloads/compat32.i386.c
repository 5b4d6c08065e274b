/*
 * compat32 WAY NR [ARG...]: a 32-bit process makes syscall NR (i386 numbers) with up to
 * six arguments by WAY: int80, syscall, sysenter, sysenter-flags (NT, AC and DF set) or
 * sysenter-nt, sysenter-ac, sysenter-df (that flag alone; see sirl32.h), and prints what it
 * returned. A CPU that does not accept the instruction in compatibility mode raises
 * #UD: the process dies of SIGILL (status 132).
 */
#include "sirl32.h"

int sirl_main(int argc, char **argv)
{
    long args[6] = {0, 0, 0, 0, 0, 0};
    int way;

    if (argc < 3) {
        sirl32_puts("usage: compat32 int80|syscall|sysenter|sysenter-flags|sysenter-nt|sysenter-ac|sysenter-df NR [ARG...]\n");
        return 2;
    }
    way = argv[1][0] == 'i' ? SIRL32_INT80 : argv[1][1] == 'y' && argv[1][3] == 'c' ? SIRL32_SYSCALL
        : sirl32_strlen(argv[1]) > 8 ? SIRL32_SYSENTER_FLAGS : SIRL32_SYSENTER;
    /* sysenter-nt, sysenter-ac, sysenter-df: that one flag alone (sysenter-flags: all three) */
    if (way == SIRL32_SYSENTER_FLAGS && argv[1][9] != 'f')
        sirl32_sysenter_flags = argv[1][9] == 'n' ? 1UL << 14 : argv[1][9] == 'a' ? 1UL << 18 : 1UL << 10;
    for (int i = 0; i < 6 && 3 + i < argc; i++)
        args[i] = sirl32_number(argv[3 + i]);
    sirl32_print_long(sirl32_call(way, sirl32_number(argv[2]), args));
    return 0;
}
