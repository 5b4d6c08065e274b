/*
 * my_compat WAY: a 32-bit program's getpid() (i386 number 20) by int80, syscall or
 * sysenter, through the project's sirl32.h; prints the pid.
 */
#include "sirl32.h"

int sirl_main(int argc, char **argv)
{
    static const long none[6];
    int way = SIRL32_INT80;

    if (argc > 1 && argv[1][0] == 's')
        way = argv[1][1] == 'y' && argv[1][3] == 'c' ? SIRL32_SYSCALL : SIRL32_SYSENTER;
    sirl32_print_long(sirl32_call(way, 20, none));
    return 0;
}
