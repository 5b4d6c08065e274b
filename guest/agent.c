/*
 * sirl-agent: the guest's command agent (PID 1 after init).
 *
 *     sirl-agent DELIVERY CHANNEL      (CHANNEL: ttyS1 or ttyS0, see guest/init)
 *
 * The host sends one line per command, "<id> <shell command>\n", read one byte at a
 * time from fd 0. The agent runs it with /bin/sh -c (stdin /dev/null) and answers on
 * CHANNEL_FD; it first says "SIRL{READY:<delivery>:<release>:<channel>}" on the kernel's
 * console (CONSOLE_FD), which tells the host which channel it talks on.
 *
 * On a channel of its own (ttyS1, set raw: every byte passes unchanged) the answer is
 * frames: a 12-byte header "SIR", kind, id (u32 big-endian), payload length (u32 BE),
 * then the payload. Per command: 'B' (empty), 'O' chunks of the command's stdout and
 * stderr (one pipe, read and forwarded by the agent), 'E' with the exit status (s32 BE).
 * Output is only ever payload, so no output can fake an end.
 *
 * On the kernel's console (ttyS0, when the kernel has no second port) the answer is
 * "SIRL{<id>:B}" and "SIRL{<id>:E:<status>}" markers around the command's output, which
 * goes to the console itself; the host takes kernel messages out by pattern.
 *
 * Either way the agent writes nothing to fd 1 (frames and markers go to CHANNEL_FD), so
 * that a breakpoint on write(1, ...) sees only the command (a shell would implement
 * `printf ... >&3` as dup2(3, 1) + write(1, ...)). Nothing is echoed (ECHO off). PID 1
 * also reaps orphans.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define CHANNEL_FD 3
#define CONSOLE_FD 4
#define LINE_MAX_LEN 4096
#define CHUNK 16384
#define HEADER 12

static int sigchld_pipe[2] = {-1, -1};

static void put(int fd, const void *data, size_t len)
{
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(3);
        p += n;
        len -= (size_t)n;
    }
}

static void be32(unsigned char *out, unsigned long value)
{
    for (int i = 0; i < 4; i++)
        out[i] = (unsigned char)(value >> (24 - 8 * i));
}

/* One write per frame: the header and at most CHUNK bytes of payload. */
static void frame(char kind, unsigned long ident, const void *data, size_t len)
{
    static unsigned char buf[HEADER + CHUNK];
    memcpy(buf, "SIR", 3);
    buf[3] = (unsigned char)kind;
    be32(buf + 4, ident);
    be32(buf + 8, len);
    if (len)
        memcpy(buf + HEADER, data, len);
    put(CHANNEL_FD, buf, HEADER + len);
}

static void marker(const char *fmt, const char *a, const char *b)
{
    char buf[256];
    int n = snprintf(buf, sizeof(buf), fmt, a, b);
    if (n > 0)
        put(CHANNEL_FD, buf, (size_t)n);
}

static int exit_status(int status)
{
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static pid_t spawn(const char *command, int out)
{
    pid_t pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        dup2(null, 0);
        if (out >= 0) {
            dup2(out, 1);
            dup2(out, 2);
        }
        execl("/bin/sh", "sh", "-c", command, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* On the console: the command writes to the console itself; wait for it. */
static int run_on_console(const char *command)
{
    pid_t pid = spawn(command, -1), got;
    int status = 0;
    if (pid < 0)
        return 255;
    while ((got = waitpid(-1, &status, 0)) != pid)
        if (got < 0 && errno != EINTR)
            return 255;
    return exit_status(status);
}

static void on_sigchld(int sig)
{
    int saved = errno;
    (void)sig;
    if (write(sigchld_pipe[1], "c", 1) < 0) {
        /* full: a wake-up is pending anyway */
    }
    errno = saved;
}

/* Reap every exited child (orphans too); 1 once *pid* is among them. */
static int reap(pid_t pid, int *status)
{
    int found = 0, st;
    pid_t got;
    while ((got = waitpid(-1, &st, WNOHANG)) > 0)
        if (got == pid) {
            *status = exit_status(st);
            found = 1;
        }
    return found;
}

/* On a channel of its own: forward the command's output as frames until it exits. The
 * wait blocks in poll() on the output pipe and the SIGCHLD self-pipe, with no timeout, so
 * an idle agent makes no syscall while its command runs (or a debugger holds it). */
static int run_framed(const char *command, unsigned long ident)
{
    static char buf[CHUNK];
    int out[2], status = 255, eof = 0;
    ssize_t n;
    if (pipe2(out, O_CLOEXEC) < 0)
        return 255;
    pid_t pid = spawn(command, out[1]);
    close(out[1]);
    frame('B', ident, NULL, 0);
    while (pid > 0 && !reap(pid, &status)) {
        struct pollfd fds[2] = {{eof ? -1 : out[0], POLLIN, 0}, {sigchld_pipe[0], POLLIN, 0}};
        if (poll(fds, 2, -1) < 0)
            continue;
        if (fds[1].revents)
            while (read(sigchld_pipe[0], buf, sizeof(buf)) > 0)
                ;
        if (fds[0].revents) {
            n = read(out[0], buf, sizeof(buf));
            if (n > 0)
                frame('O', ident, buf, (size_t)n);
            else if (n == 0 || errno != EINTR)
                eof = 1;
        }
    }
    /* What the command wrote before it exited is in the pipe; a background process that
     * keeps the pipe open is not waited for (its later output is lost: SIGPIPE). */
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    while ((n = read(out[0], buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR))
        if (n > 0)
            frame('O', ident, buf, (size_t)n);
    close(out[0]);
    unsigned char end[4];
    be32(end, (unsigned long)status);
    frame('E', ident, end, sizeof(end));
    return status;
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

/* The channel carries bytes, not lines: no echo, no CR/NL mapping on either side, 8 bits,
 * no signals from control characters. */
static void set_raw(int fd)
{
    struct termios tio;
    if (tcgetattr(fd, &tio) == 0) {
        cfmakeraw(&tio);
        tio.c_cflag |= CLOCAL | CREAD;
        tio.c_cflag &= ~(tcflag_t)CRTSCTS;
        tio.c_cc[VMIN] = 1;
        tio.c_cc[VTIME] = 0;
        tcsetattr(fd, TCSANOW, &tio);
    }
}

static void set_no_echo(int fd)
{
    struct termios tio;
    if (tcgetattr(fd, &tio) == 0) {
        tio.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL);
        tcsetattr(fd, TCSANOW, &tio);
    }
}

static void setup_sigchld(void)
{
    struct sigaction sa;
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
        _exit(4);
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
}

int main(int argc, char **argv)
{
    struct utsname uts;
    char line[LINE_MAX_LEN], ident[16];
    const char *delivery = argc > 1 ? argv[1] : "unknown";
    int framed = argc > 2 && strcmp(argv[2], "ttyS0") != 0;

    /* fd 0 is the channel (read and write), fd 1 the kernel's console. */
    dup2(framed ? 0 : 1, CHANNEL_FD);
    dup2(1, CONSOLE_FD);
    fcntl(CHANNEL_FD, F_SETFD, FD_CLOEXEC);
    fcntl(CONSOLE_FD, F_SETFD, FD_CLOEXEC);
    if (framed) {
        set_raw(0);
        setup_sigchld();
    } else {
        set_no_echo(0);
    }
    uname(&uts);
    {
        char ready[512];
        int n = snprintf(ready, sizeof(ready), "SIRL{READY:%s:%s:%s}\n", delivery, uts.release,
                         framed ? argv[2] : "ttyS0");
        if (n > 0)
            put(CONSOLE_FD, ready, (size_t)n);
    }
    while (read_line(line, sizeof(line)) >= 0) {
        char *space = strchr(line, ' ');
        if (space == NULL)
            continue;
        *space = '\0';
        if (framed) {
            char *end;
            unsigned long id = strtoul(line, &end, 10);
            if (*end == '\0')
                run_framed(space + 1, id);
            continue;
        }
        marker("SIRL{%s:B}\n%s", line, "");
        snprintf(ident, sizeof(ident), "%d", run_on_console(space + 1));
        marker("SIRL{%s:E:%s}\n", line, ident);
    }
    return 0;
}
