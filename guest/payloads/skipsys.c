/*
 * skipsys: a ptrace tracer skips its child's syscall the way debuggers and seccomp
 * tracers do: at the syscall-entry stop of the child's getppid(MARK) it sets orig_rax to
 * -1 and rax to SKIPPED, then lets the child run. do_syscall_64 must run nothing for
 * nr == -1 (not even sys_ni_syscall, which would overwrite rax with -ENOSYS), so the
 * child's syscall returns SKIPPED. The child prints what its syscall returned; the parent
 * exits with the child's status (3: ptrace failed, 4: the child's syscall never stopped).
 * `skipsys int80`: the child makes the i386 getppid(MARK) by `int $0x80` instead (64-bit code,
 * the ia32 ABI: number in eax, argument in ebx); do_int80_syscall_32 must run nothing either.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>
#include "sirl.h"

#define MARK 0x5eed
#define SKIPPED 0x1234
#define GETPPID 110
#define I386_GETPPID 64 /* arch/x86/entry/syscalls/syscall_32.tbl */

static int int80;

static long int80_getppid(long mark)
{
    long ret;

    __asm__ volatile("int $0x80" : "=a"(ret) : "a"((long)I386_GETPPID), "b"(mark) : "memory");
    return ret;
}

static int child(void)
{
    if (ptrace(PTRACE_TRACEME, 0, 0, 0))
        return 3;
    raise(SIGSTOP);
    printf("%ld\n", int80 ? int80_getppid(MARK) : sirl_syscall6(GETPPID, MARK, 0, 0, 0, 0, 0));
    return 0;
}

/* Syscall stops until the child's getppid(MARK); there, skip it. 0 when done. */
static int skip_marked(pid_t pid)
{
    struct user_regs_struct regs;
    int status;

    for (int stops = 0; stops < 64; stops++) {
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0) || waitpid(pid, &status, 0) != pid || !WIFSTOPPED(status))
            return 4;
        if (ptrace(PTRACE_GETREGS, pid, 0, &regs))
            return 3;
        if (int80 ? regs.orig_rax == I386_GETPPID && regs.rbx == MARK : regs.orig_rax == GETPPID && regs.rdi == MARK) {
            regs.orig_rax = (unsigned long)-1;
            regs.rax = SKIPPED;
            return ptrace(PTRACE_SETREGS, pid, 0, &regs) ? 3 : 0;
        }
    }
    return 4;
}

int main(int argc, char **argv)
{
    int status;

    int80 = argc > 1 && argv[1][0] == 'i'; /* "int80" */
    pid_t pid = fork();

    if (pid == 0)
        return child();
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFSTOPPED(status))
        return 3;
    int failed = skip_marked(pid);
    if (failed) {
        kill(pid, SIGKILL);
        return failed;
    }
    if (ptrace(PTRACE_DETACH, pid, 0, 0) || waitpid(pid, &status, 0) != pid)
        return 3;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
