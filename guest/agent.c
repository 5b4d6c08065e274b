/*
 * sirl-agent: the guest's command agent on the serial console (PID 1 after init).
 *
 * The host sends one line per command, "<id> <shell command>". The agent answers
 * "SIRL{<id>:B}" before and "SIRL{<id>:E:<status>}" after running it with
 * /bin/sh -c (stdin /dev/null, stdout and stderr the console). Markers are written
 * with write(MARKER_FD, ...) straight from this program: a shell would implement
 * `printf ... >&3` as dup2(3, 1) + write(1, ...), and the guest must write nothing
 * to fd 1 of its own, so that a breakpoint on write(1, ...) sees only the command.
 * The terminal does not echo (termios ECHO off) and nothing here is interactive, so
 * keystrokes are never written back either. Also reaps orphans, as PID 1 must.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define MARKER_FD 3
#define LINE_MAX_LEN 4096

static void marker(const char *fmt, const char *a, const char *b)
{
    char buf[256];
    int n = snprintf(buf, sizeof(buf), fmt, a, b);
    if (n > 0 && write(MARKER_FD, buf, (size_t)n) < 0)
        _exit(3);
}

static int run(const char *command)
{
    pid_t pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        dup2(null, 0);
        execl("/bin/sh", "sh", "-c", command, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    pid_t got;
    while ((got = waitpid(-1, &status, 0)) != pid)
        if (got < 0 && errno != EINTR)
            return 255;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int read_line(char *line, size_t size)
{
    size_t len = 0;
    char c;
    for (;;) {
        ssize_t n = read(0, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        if (c == '\n')
            break;
        if (len + 1 < size)
            line[len++] = c;
    }
    line[len] = '\0';
    return (int)len;
}

int main(int argc, char **argv)
{
    struct termios tio;
    struct utsname uts;
    char line[LINE_MAX_LEN], status[16];

    if (tcgetattr(0, &tio) == 0) {
        tio.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL);
        tcsetattr(0, TCSANOW, &tio);
    }
    dup2(1, MARKER_FD);
    fcntl(MARKER_FD, F_SETFD, FD_CLOEXEC);
    uname(&uts);
    marker("SIRL{READY:%s:%s}\n", argc > 1 ? argv[1] : "unknown", uts.release);
    while (read_line(line, sizeof(line)) >= 0) {
        char *space = strchr(line, ' ');
        if (space == NULL)
            continue;
        *space = '\0';
        marker("SIRL{%s:B}\n%s", line, "");
        snprintf(status, sizeof(status), "%d", run(space + 1));
        marker("SIRL{%s:E:%s}\n", line, status);
    }
    return 0;
}
