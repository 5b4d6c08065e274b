/*
 * sysret_check MODE: rt_sigreturn to a crafted user context that breaks exactly one of
 * the conditions under which the kernel may return with SYSRET (6.1 entry_64.S; C in
 * do_syscall_64 since 6.7), so the kernel must return by IRET:
 *
 *   rcx          RCX != RIP (RCX set to RIP + 1; the interrupted code had just made a
 *                syscall, which clobbers RCX, so it does not care)
 *   r11          R11 != RFLAGS (likewise clobbered by that syscall)
 *   rf           RFLAGS.RF set (SYSRET cannot restore RF)
 *   noncanonical RIP = 0x800000000000, the first non-canonical address: SYSRET there
 *                faults in ring 0 on Intel CPUs; IRET faults in user context, and the
 *                process dies of SIGSEGV (status 139)
 *   cs32         CS = __USER32_CS (0x23), RIP = compat_code below: the process then runs
 *                32-bit code, which exits with status 4 (5 if it ran as 64-bit code)
 *   rcxhigh      RCX = RIP with bits 63:48 set: RCX != RIP, but RCX sign-extended from
 *                bit 47 is RIP, so only the RCX == RIP check refuses it (6.1 checks that
 *                RCX is canonical by comparing RCX sign-extended with RIP)
 *   top          RIP = RCX = 0x7fffffffeffe, the last two bytes below TASK_SIZE_MAX
 *                (4-level paging), where the program maps `jmp .-16` after code that
 *                exits with status 7: canonical and below TASK_SIZE_MAX, so eligible
 *                (exits 3 if the page cannot be mapped)
 *   tasksize     RIP = RCX = 0x7ffffffff000 = TASK_SIZE_MAX: canonical, but no user page
 *                can be there (6.12 refuses ip >= TASK_SIZE_MAX, 6.1 checks canonical);
 *                the process dies of SIGSEGV whichever way it returns
 *   ss           SS = 0x7, an LDT data segment the program installs with modify_ldt
 *                (UC_STRICT_RESTORE_SS keeps it): SYSRET would load __USER_DS instead.
 *                Exits 3 if modify_ldt fails (-38, ENOSYS: no CONFIG_MODIFY_LDT_SYSCALL)
 *   none         the context as it was: an ordinary, SYSRET-eligible rt_sigreturn
 *
 * In every mode the other conditions hold (RCX follows a new RIP, R11 new RFLAGS), so
 * the one broken condition is the only reason for IRET.
 *
 * The rt_sigreturn is made from our own restorer (rt_sigaction with SA_RESTORER, raw),
 * at the label sirl_syscall_insn. Prints "<mode> rcx=<hex> r11=<hex> ss=<hex>" as it resumes.
 */
#define _GNU_SOURCE /* REG_* of ucontext_t */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <ucontext.h>
#include <sys/mman.h>

#define SA_RESTORER_FLAG 0x04000000
#define USER32_CS 0x23UL
#define RF (1UL << 16)
#define LDT_SS 0x7L /* LDT entry 0, RPL 3 */
#define UC_STRICT_RESTORE_SS_FLAG 0x4UL
#define TASK_SIZE_MAX 0x7ffffffff000UL /* (1 << 47) - PAGE_SIZE: 4-level paging */
#define TOP_PAGE (TASK_SIZE_MAX - 0x1000)
#define TOP_IP (TASK_SIZE_MAX - 2)

/* struct user_desc of asm/ldt.h: a flat, writable 32-bit data segment in LDT entry 0 */
struct sirl_user_desc {
    unsigned int entry_number, base_addr, limit;
    unsigned int seg_32bit : 1, contents : 2, read_exec_only : 1, limit_in_pages : 1, seg_not_present : 1,
        useable : 1, lm : 1;
};

struct kernel_sigaction {
    void (*handler)(int, siginfo_t *, void *);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};

void sirl_restore(void);
void compat_code(void);

__asm__(".text\n"
        ".globl sirl_restore\n"
        "sirl_restore:\n\t"
        "movl $15, %eax\n" /* rt_sigreturn */
        ".globl sirl_syscall_insn\n"
        "sirl_syscall_insn:\n\t"
        "syscall\n\t"
        "hlt\n"
        /* 32-bit: b8 05 00 00 00 mov $5,%eax; 48 dec %eax (64-bit: a REX prefix of the nop) */
        ".globl compat_code\n"
        "compat_code:\n\t"
        ".byte 0xb8, 0x05, 0x00, 0x00, 0x00\n\t"
        ".byte 0x48, 0x90\n\t"
        ".byte 0x89, 0xc3\n\t"                     /* mov %eax,%ebx */
        ".byte 0xb8, 0x01, 0x00, 0x00, 0x00\n\t"   /* mov $1,%eax: exit */
        ".byte 0xcd, 0x80\n\t"                     /* int $0x80 */
        "hlt\n");

static const char *mode;

/* The top user page: at TOP_IP - 14, exit(7) (mov $60,%eax; mov $7,%edi; syscall); at
 * TOP_IP, `jmp .-16` back to it. Returns 0, or the errno of the failed mmap/mprotect. */
static int map_top_page(void)
{
    static const unsigned char code[] = {0xb8, 0x3c, 0, 0, 0, 0xbf, 7, 0, 0, 0, 0x0f, 0x05, 0xf4, 0xf4,
                                         0xeb, 0xf0};
    unsigned char *page = mmap((void *)TOP_PAGE, 0x1000, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (page != (void *)TOP_PAGE)
        return page == MAP_FAILED ? -1 : -2;
    memcpy(page + 0x1000 - sizeof(code), code, sizeof(code));
    return mprotect(page, 0x1000, PROT_READ | PROT_EXEC);
}

static long raw3(long nr, long a0, long a1, long a2, long a3)
{
    register long r10 __asm__("r10") = a3;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a0), "S"(a1), "d"(a2), "r"(r10) : "rcx", "r11", "memory");
    return ret;
}

static void on_usr1(int sig, siginfo_t *info, void *context)
{
    greg_t *g = ((ucontext_t *)context)->uc_mcontext.gregs;
    (void)sig;
    (void)info;
    /* The kill syscall left RCX == RIP and R11 == RFLAGS: each mode keeps every other
     * condition true (RCX follows a new RIP, R11 new RFLAGS). */
    if (!strcmp(mode, "rcx"))
        g[REG_RCX] = g[REG_RIP] + 1;
    else if (!strcmp(mode, "r11"))
        g[REG_R11] = g[REG_EFL] ^ 0x801; /* CF and OF flipped */
    else if (!strcmp(mode, "rf"))
        g[REG_R11] = g[REG_EFL] |= RF;
    else if (!strcmp(mode, "rcxhigh"))
        g[REG_RCX] = g[REG_RIP] | (greg_t)0xffff000000000000UL;
    else if (!strcmp(mode, "top"))
        g[REG_RCX] = g[REG_RIP] = (greg_t)TOP_IP;
    else if (!strcmp(mode, "tasksize"))
        g[REG_RCX] = g[REG_RIP] = (greg_t)TASK_SIZE_MAX;
    else if (!strcmp(mode, "noncanonical"))
        g[REG_RCX] = g[REG_RIP] = 0x800000000000L;
    else if (!strcmp(mode, "ss")) {
        /* The saved SS is the top 16 bits of REG_CSGSFS (cs, gs, fs, ss) */
        g[REG_CSGSFS] = (g[REG_CSGSFS] & 0xffffffffffffL) | (LDT_SS << 48);
        ((ucontext_t *)context)->uc_flags |= UC_STRICT_RESTORE_SS_FLAG;
    } else if (!strcmp(mode, "cs32")) {
        g[REG_RCX] = g[REG_RIP] = (greg_t)(unsigned long)compat_code;
        g[REG_CSGSFS] = (g[REG_CSGSFS] & ~0xffffL) | USER32_CS;
    }
}

int main(int argc, char **argv)
{
    struct kernel_sigaction sa;
    unsigned long rcx, r11;

    mode = argc > 1 ? argv[1] : "none";
    memset(&sa, 0, sizeof(sa));
    sa.handler = on_usr1;
    sa.flags = SA_SIGINFO | SA_RESTORER_FLAG;
    sa.restorer = sirl_restore;
    if (raw3(13 /* rt_sigaction */, SIGUSR1, (long)&sa, 0, 8))
        return 2;
    if (!strcmp(mode, "top") && map_top_page()) {
        printf("top: cannot map %#lx\n", TOP_PAGE);
        return 3;
    }
    if (!strcmp(mode, "ss")) {
        struct sirl_user_desc desc = {0, 0, 0xfffff, 1, 0, 0, 1, 0, 1, 0};
        long err = raw3(154 /* modify_ldt */, 1, (long)&desc, sizeof(desc), 0);
        if (err) {
            printf("ss: modify_ldt returned %ld\n", err);
            return 3;
        }
    }
    /* kill(getpid(), SIGUSR1) by hand: RCX and R11 right after it are what sigreturn gave back */
    __asm__ volatile("syscall\n\t"
                     "movq %%rcx, %[rcx]\n\t"
                     "movq %%r11, %[r11]"
                     : [rcx] "=m"(rcx), [r11] "=m"(r11)
                     : "a"(62L), "D"(raw3(39 /* getpid */, 0, 0, 0, 0)), "S"((long)SIGUSR1)
                     : "rcx", "r11", "memory", "cc");
    unsigned long ss;
    __asm__ volatile("movq %%ss, %0" : "=r"(ss));
    printf("%s rcx=%#lx r11=%#lx ss=%#lx\n", mode, rcx, r11, ss);
    return 0;
}
