/*
 * The classic: write(1, "syscall_irl\n", 12) through a raw `syscall` instruction, no
 * libc wrapper in between. r10, r8 and r9 carry distinct values that write() ignores,
 * so a trace can tell every argument register apart.
 */
#include "sirl.h"

static const char message[] = "syscall_irl\n";

int main(void)
{
    long ret = sirl_syscall6(1, 1, (long)message, sizeof(message) - 1,
                             0x1010101010L, 0x0808080808L, 0x0909090909L);
    return ret == (long)(sizeof(message) - 1) ? 0 : 1;
}
