/*
 * rawsys NR [A0..A5]: one raw syscall with the given number and arguments (strtol
 * syntax, 0x... allowed); prints the value RAX held afterwards, as a signed decimal.
 * Used for out-of-range numbers (-ENOSYS) and for dup, whose result is the new fd.
 */
#include "sirl.h"

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: rawsys NR [A0..A5]\n");
        return 2;
    }
    long ret = sirl_syscall6(strtol(argv[1], NULL, 0), sirl_arg(argc, argv, 2, 0),
                             sirl_arg(argc, argv, 3, 0), sirl_arg(argc, argv, 4, 0),
                             sirl_arg(argc, argv, 5, 0), sirl_arg(argc, argv, 6, 0),
                             sirl_arg(argc, argv, 7, 0));
    printf("%ld\n", ret);
    return 0;
}
