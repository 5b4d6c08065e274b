/*
 * sysretl_check MODE: a 32-bit process makes an rt_sigreturn by the 32-bit `syscall`
 * (MSR_CSTAR, labelled sirl_sigreturn_insn) to a crafted context that breaks exactly one
 * of the conditions under which do_fast_syscall_32 lets the kernel return with SYSRETL
 * (6.1 and 6.12 arch/x86/entry/common.c): EIP at the vDSO's int80_landing_pad, CS ==
 * __USER32_CS, SS == __USER_DS, neither RF nor TF in EFLAGS. Every other condition holds.
 *
 *   none   the context points at the landing pad as a vDSO call would: SYSRETL-eligible
 *   ip     EIP = sirl_resume32 (not the landing pad), ECX = SIRL_MAGIC_CX: IRET restores
 *          ECX, SYSRETL would leave ECX = EIP
 *   cs     CS = __USER_CS (0x33): after IRET the landing pad runs as 64-bit code, pops
 *          8-byte words and returns to 64-bit code that exits with status 5; SYSRETL
 *          forces __USER32_CS (the 32-bit continuation exits 0)
 *   ss     SS = a flat data segment in a TLS slot (set_thread_area): SYSRETL would load
 *          __USER_DS instead (the continuation exits 11 if SS is not the one asked for)
 *   rf     EFLAGS.RF set (SYSRETL cannot restore it)
 *   tf     EFLAGS.TF set: IRET runs one instruction, then the process dies of SIGTRAP (133)
 *   efault exit_group(7) by the 32-bit syscall with ESP = 16: the kernel cannot read
 *          argument 6 from the user stack, so it must not run the call but return -EFAULT
 *          (by IRET); the landing pad then faults, and a SIGSEGV handler on an alternate
 *          stack exits with -EAX (14). Exit status 7 means the call ran.
 *
 * The landing pad (the instruction after the vDSO's `int $0x80`, where the kernel returns
 * fast 32-bit calls, so that a restart's EIP - 2 is that `int $0x80`) is found by scanning
 * __kernel_vsyscall (AT_SYSINFO) for `int $0x80; pop %ebp; pop %edx; pop %ecx`. The
 * continuation prints "<mode> ecx=<hex> ss=<hex>" and exits 0, or 10 if ECX is not
 * SIRL_MAGIC_CX, 11 if SS is not the expected one; 3: no landing pad, 4: a setup call failed.
 */
#include "sirl32.h"

#define SIRL_MAGIC_CX 0x5eed5eedUL
#define USER_CS 0x33
#define USER_DS 0x2b
#define EFLAGS_TF (1UL << 8)
#define EFLAGS_RF (1UL << 16)
#define SIGTRAP_NR 5
#define SIGUSR1_NR 10
#define SIGSEGV_NR 11
#define SA_SIGINFO_FLAG 4UL
#define SA_ONSTACK_FLAG 0x08000000UL
#define SA_RESTORER_FLAG 0x04000000UL
#define AT_SYSINFO 32

/* struct sigcontext_32 and struct ucontext_ia32 (arch/x86/include/...) */
struct sirl_sc32 {
    unsigned short gs, gsh, fs, fsh, es, esh, ds, dsh;
    unsigned long di, si, bp, sp, bx, dx, cx, ax, trapno, err, ip;
    unsigned short cs, csh;
    unsigned long flags, sp_at_signal;
    unsigned short ss, ssh;
};

struct sirl_uc32 {
    unsigned long uc_flags, uc_link, ss_sp, ss_flags, ss_size;
    struct sirl_sc32 mc;
};

struct sirl_sigaction32 {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask[2];
};

void sirl_restore(void);
void sirl_resume32(void);
void sirl_resume64(void);
void sirl_resumed(unsigned long ecx, unsigned long ss);
void sirl_efault(void);

/* Where the sigreturn resumes: d0..d3 are what the landing pad pops as 32-bit code (ebp, edx,
 * ecx, return address), d0..d7 what it pops as 64-bit code (rbp, rdx, rcx, return address).
 * The continuation's C code runs on the space below. */
unsigned long sirl_resume_stack[1024] __attribute__((aligned(16)));
#define RESUME_WORDS (sirl_resume_stack + 1024 - 16)

static const char *mode;
static unsigned long landing_pad, expected_ss = USER_DS;
static char altstack[8192];

__asm__(".text\n"
        "sirl_restore:\n\t"
        "movl $173, %eax\n"                  /* rt_sigreturn, frame at ESP - 4 */
        ".globl sirl_sigreturn_insn\n"
        "sirl_sigreturn_insn:\n\t"
        "syscall\n\t"
        "ud2\n"
        ".globl sirl_resume32\n"
        "sirl_resume32:\n\t"
        "movl %ss, %eax\n\t"
        "pushl %eax\n\t"
        "pushl %ecx\n\t"
        "call sirl_resumed\n\t"
        "hlt\n"
        /* 64-bit code: mov $60,%eax; mov $5,%edi; syscall (exit(5)) */
        ".globl sirl_resume64\n"
        "sirl_resume64:\n\t"
        ".byte 0xb8, 0x3c, 0x00, 0x00, 0x00\n\t"
        ".byte 0xbf, 0x05, 0x00, 0x00, 0x00\n\t"
        ".byte 0x0f, 0x05\n\t"
        "hlt\n"
        /* exit_group(7) by the 32-bit syscall, with no readable user stack */
        ".globl sirl_efault\n"
        "sirl_efault:\n\t"
        "movl $252, %eax\n\t"
        "movl $7, %ebx\n\t"
        "movl $16, %esp\n"
        ".globl sirl_efault_insn\n"
        "sirl_efault_insn:\n\t"
        "syscall\n\t"
        "ud2\n");

static long call3(long nr, long a0, long a1, long a2, long a3)
{
    long args[6] = {a0, a1, a2, a3, 0, 0};
    return sirl32_call(SIRL32_INT80, nr, args);
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static unsigned long find_landing_pad(char **envp)
{
    unsigned long *aux;
    const unsigned char *p;

    while (*envp)
        envp++;
    for (aux = (unsigned long *)(envp + 1); aux[0]; aux += 2)
        if (aux[0] == AT_SYSINFO)
            for (p = (const unsigned char *)aux[1]; p < (const unsigned char *)aux[1] + 64; p++)
                if (p[0] == 0xcd && p[1] == 0x80 && p[2] == 0x5d && p[3] == 0x5a && p[4] == 0x59)
                    return (unsigned long)(p + 2);
    return 0;
}

void sirl_resumed(unsigned long ecx, unsigned long ss)
{
    char line[16];
    int i = 0;
    long status = ecx != SIRL_MAGIC_CX ? 10 : (ss & 0xffff) != expected_ss ? 11 : 0;

    sirl32_puts(mode);
    sirl32_puts(" ecx=");
    for (int shift = 28; shift >= 0; shift -= 4)
        line[i++] = "0123456789abcdef"[(ecx >> shift) & 15];
    line[i] = 0;
    sirl32_puts(line);
    sirl32_puts(" ss=");
    sirl32_print_long((long)(ss & 0xffff));
    call3(252 /* exit_group */, status, 0, 0, 0);
}

static void on_signal(int sig, void *info, struct sirl_uc32 *uc)
{
    struct sirl_sc32 *sc = &uc->mc;
    (void)info;
    if (sig == SIGSEGV_NR)
        call3(252 /* exit_group */, -(long)sc->ax, 0, 0, 0);
    sc->ip = landing_pad;
    sc->sp = (unsigned long)RESUME_WORDS;
    sc->cx = SIRL_MAGIC_CX;
    if (streq(mode, "ip"))
        sc->ip = (unsigned long)sirl_resume32, sc->sp += 16; /* as if the landing pad had popped */
    else if (streq(mode, "cs"))
        sc->cs = USER_CS;
    else if (streq(mode, "ss"))
        sc->ss = (unsigned short)expected_ss;
    else if (streq(mode, "rf"))
        sc->flags |= EFLAGS_RF;
    else if (streq(mode, "tf"))
        sc->flags |= EFLAGS_TF;
}

static long handle(int sig, unsigned long flags)
{
    struct sirl_sigaction32 sa = {(void *)on_signal, SA_SIGINFO_FLAG | SA_RESTORER_FLAG | flags,
                                  (void *)sirl_restore, {0, 0}};
    return call3(174 /* rt_sigaction */, sig, (long)&sa, 0, 8);
}

static long tls_data_segment(void)
{
    /* struct user_desc: entry -1 (any free TLS slot), base 0, limit 0xfffff pages,
     * seg_32bit | limit_in_pages | useable: a flat, writable data segment */
    unsigned long desc[4] = {(unsigned long)-1, 0, 0xfffff, 0x51};
    long ret = call3(243 /* set_thread_area */, (long)desc, 0, 0, 0);
    return ret ? -1 : (long)(desc[0] << 3 | 3);
}

int sirl_main(int argc, char **argv)
{
    unsigned long *words = RESUME_WORDS;
    unsigned long alt[3] = {(unsigned long)altstack, 0, sizeof(altstack)};

    mode = argc > 1 ? argv[1] : "none";
    if (streq(mode, "efault")) {
        if (call3(186 /* sigaltstack */, (long)alt, 0, 0, 0) || handle(SIGSEGV_NR, SA_ONSTACK_FLAG))
            return 4;
        sirl_efault();
    }
    landing_pad = find_landing_pad(argv + argc + 1);
    if (!landing_pad) {
        sirl32_puts("no int80_landing_pad in the vDSO (AT_SYSINFO)\n");
        return 3;
    }
    words[0] = 0, words[1] = 0, words[2] = SIRL_MAGIC_CX, words[3] = (unsigned long)sirl_resume32;
    words[4] = 0, words[5] = 0, words[6] = (unsigned long)sirl_resume64, words[7] = 0;
    if (streq(mode, "ss") && (long)(expected_ss = tls_data_segment()) < 0)
        return 4;
    if (handle(SIGUSR1_NR, 0))
        return 4;
    call3(37 /* kill */, call3(20 /* getpid */, 0, 0, 0, 0), SIGUSR1_NR, 0, 0);
    sirl32_puts("the sigreturn came back to the kill\n");
    return 5;
}
