/*
 * rdmsr MSR...: read model-specific registers through /dev/cpu/0/msr (CONFIG_X86_MSR):
 * the file offset is the MSR number, reads are 8 bytes. Prints "0xMSR 0xVALUE" lines.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int fd = open("/dev/cpu/0/msr", O_RDONLY);
    if (fd < 0) {
        perror("/dev/cpu/0/msr");
        return 3;
    }
    for (int i = 1; i < argc; i++) {
        unsigned long msr = strtoul(argv[i], NULL, 0);
        uint64_t value;
        if (pread(fd, &value, sizeof(value), (off_t)msr) != sizeof(value)) {
            perror("pread");
            return 4;
        }
        printf("%#lx %#llx\n", msr, (unsigned long long)value);
    }
    return 0;
}
