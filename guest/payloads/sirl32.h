/*
 * i386 guest payloads (*.i386.c): freestanding, since musl-gcc builds only x86_64. A
 * tiny _start calls sirl_main(argc, argv); sirl32_call() makes one syscall by any of
 * the three 32-bit ways into the kernel, each instruction at a label of its own:
 *
 *   sirl_int80_insn     int $0x80     IDT vector 0x80
 *   sirl_syscall_insn   syscall       MSR_CSTAR (compatibility mode; AMD-style CPUs)
 *   sirl_sysenter_insn  sysenter      MSR_IA32_SYSENTER_EIP (Intel-style CPUs)
 *
 * SIRL32_SYSENTER_FLAGS is sysenter with the EFLAGS bits in sirl32_sysenter_flags set (NT,
 * AC and DF unless the program says otherwise; SYSENTER clears none of them: the kernel
 * must), cleared again once the call is back.
 *
 * syscall and sysenter follow the vDSO's calling convention (__kernel_vsyscall, 6.1
 * arch/x86/entry/vdso/vdso32/system_call.S): ecx, edx, ebp pushed, ebp = esp for
 * sysenter (SYSENTER loses ESP) or ebp = ecx for syscall (SYSCALL clobbers ECX); the
 * kernel reads argument 6 from [esp] and returns to the vDSO's int80_landing_pad,
 * which pops the three and returns to our caller.
 */
#ifndef SIRL32_H
#define SIRL32_H

enum sirl32_way { SIRL32_INT80 = 0, SIRL32_SYSCALL = 1, SIRL32_SYSENTER = 2, SIRL32_SYSENTER_FLAGS = 3 };

long sirl32_call(int way, long nr, const long *args);
/* EFLAGS bits SIRL32_SYSENTER_FLAGS sets: AC (bit 18), NT (bit 14), DF (bit 10) */
unsigned long sirl32_sysenter_flags = 0x44400;
int sirl_main(int argc, char **argv);

__asm__(
    ".text\n"
    ".globl _start\n"
    "_start:\n\t"
    "xorl %ebp, %ebp\n\t"
    "movl (%esp), %eax\n\t"          /* argc */
    "leal 4(%esp), %edx\n\t"         /* argv */
    "andl $-16, %esp\n\t"
    "subl $8, %esp\n\t"
    "pushl %edx\n\t"
    "pushl %eax\n\t"
    "call sirl_main\n\t"
    "movl %eax, %ebx\n\t"
    "movl $1, %eax\n\t"              /* exit */
    "int $0x80\n\t"
    "hlt\n"

    ".globl sirl32_call\n"
    "sirl32_call:\n\t"
    "pushl %ebp\n\t"
    "pushl %ebx\n\t"
    "pushl %esi\n\t"
    "pushl %edi\n\t"
    "movl 24(%esp), %eax\n\t"        /* nr */
    "movl 28(%esp), %ebp\n\t"        /* args */
    "movl 0(%ebp), %ebx\n\t"
    "movl 4(%ebp), %ecx\n\t"
    "movl 8(%ebp), %edx\n\t"
    "movl 12(%ebp), %esi\n\t"
    "movl 16(%ebp), %edi\n\t"
    "movl 20(%ebp), %ebp\n\t"
    "cmpl $1, 20(%esp)\n\t"
    "je 1f\n\t"
    "cmpl $2, 20(%esp)\n\t"
    "je 2f\n\t"
    "cmpl $3, 20(%esp)\n\t"
    "je 3f\n"
    ".globl sirl_int80_insn\n"
    "sirl_int80_insn:\n\t"
    "int $0x80\n\t"
    "jmp 9f\n"
    "1:\n\t"
    "call sirl32_vsyscall_syscall\n\t"
    "jmp 9f\n"
    "2:\n\t"
    "call sirl32_vsyscall_sysenter\n\t"
    "jmp 9f\n"
    "3:\n\t"
    "pushfl\n\t"
    "pushl %eax\n\t"
    "movl sirl32_sysenter_flags, %eax\n\t"
    "orl %eax, 4(%esp)\n\t"
    "popl %eax\n\t"
    "popfl\n\t"
    "call sirl32_vsyscall_sysenter\n\t"
    "pushfl\n\t"
    "pushl %eax\n\t"
    "movl sirl32_sysenter_flags, %eax\n\t"
    "notl %eax\n\t"
    "andl %eax, 4(%esp)\n\t"
    "popl %eax\n\t"
    "popfl\n"
    "9:\n\t"
    "popl %edi\n\t"
    "popl %esi\n\t"
    "popl %ebx\n\t"
    "popl %ebp\n\t"
    "ret\n"

    "sirl32_vsyscall_syscall:\n\t"
    "pushl %ecx\n\t"
    "pushl %edx\n\t"
    "pushl %ebp\n\t"
    "movl %ecx, %ebp\n"
    ".globl sirl_syscall_insn\n"
    "sirl_syscall_insn:\n\t"
    "syscall\n\t"
    "ud2\n"                          /* the kernel returns to the vDSO landing pad */

    "sirl32_vsyscall_sysenter:\n\t"
    "pushl %ecx\n\t"
    "pushl %edx\n\t"
    "pushl %ebp\n\t"
    "movl %esp, %ebp\n"
    ".globl sirl_sysenter_insn\n"
    "sirl_sysenter_insn:\n\t"
    "sysenter\n\t"
    "ud2\n");

static inline long sirl32_int80(long nr, long a0, long a1, long a2)
{
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a0), "c"(a1), "d"(a2) : "memory");
    return ret;
}

static inline unsigned long sirl32_strlen(const char *s)
{
    unsigned long n = 0;
    while (s[n])
        n++;
    return n;
}

static inline void sirl32_puts(const char *s)
{
    sirl32_int80(4 /* write */, 1, (long)s, (long)sirl32_strlen(s));
}

/* strtol for 0x-prefixed hex and optionally negative decimal */
static inline long sirl32_number(const char *s)
{
    long sign = 1, value = 0, base = 10;
    if (*s == '-') {
        sign = -1;
        s++;
    }
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (; *s; s++) {
        long digit = *s >= '0' && *s <= '9' ? *s - '0'
                   : *s >= 'a' && *s <= 'f' ? *s - 'a' + 10
                   : *s >= 'A' && *s <= 'F' ? *s - 'A' + 10 : 99;
        if (digit >= base)
            break;
        value = value * base + digit;
    }
    return sign * value;
}

/* "<decimal>\n" of a signed value */
static inline void sirl32_print_long(long v)
{
    char buf[16];
    int i = sizeof(buf) - 1;
    unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;
    buf[i--] = 0;
    buf[i--] = '\n';
    do {
        buf[i--] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        buf[i--] = '-';
    sirl32_puts(buf + i + 1);
}

#endif
