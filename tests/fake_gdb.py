#!/usr/bin/env python3
"""A fake ``gdb --interpreter=mi3`` that answers with MI text recorded from GDB 13.1 + QEMU 7.2.

It reads tokened MI commands on stdin and answers in GDB's order and format, echoing
the token. What it does that the unit tests rely on:

- ``-exec-continue`` with a breakpoint inserted: ``^running``, ``*running``, then a
  ``*stopped`` breakpoint-hit. Without one the target "runs" until the next command:
  ``-exec-interrupt`` stops it with SIGINT; any other command gets a ``*stopped`` record
  (breakpoint 7) in the middle of its own response, between stream records and the result.
- ``-data-evaluate-expression`` echoes the unquoted expression back as the value, so a
  quoting round trip is visible; ``(unsigned long)&NAME`` answers from SYMBOLS; an
  expression naming ``nosuch`` gets GDB's ``^error``.
- ``-fake-sleep SECONDS`` answers late; ``-fake-wait-file PATH`` answers once PATH
  exists; ``-fake-die CODE`` exits without answering;
  ``-fake-stderr TEXT`` writes TEXT to stderr.
- FAKE_GDB_HANG=1: ignore SIGTERM and never answer ``-gdb-exit`` (a wedged GDB).
- FAKE_GDB_LOSE_INTERRUPTS=N: answer the first N ``-exec-interrupt`` with ``^done`` and no
  stop, as GDB 13 does when one arrives while it tests a breakpoint condition.
- FAKE_GDB_ARGV=FILE: write the command line there (one argument per line).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

SYMBOLS = {"main": 0x401615, "start_kernel": 0xFFFFFFFF818E0BBE, "entry_SYSCALL_64": 0xFFFFFFFF81200040}
REGISTER_NAMES = ["rax", "rbx", "rip", "eflags", "", "", "cs", "xmm0", "al"]
REGISTER_VALUES = [
    "0x0", "0x1c28", "0xffffffff818e0bbe", "0x246", "0x0", "0x0", "0x10",
    "{v4_float = {0x0, 0x0, 0x0, 0x0}, v2_int64 = {0x0, 0x0}, uint128 = 0x0}", "0x0",
]
FRAME = (
    'frame={addr="0xffffffff818e0bbe",func="start_kernel",args=[],'
    'file="init/main.c",fullname="/src/init/main.c",line="914",arch="i386:x86-64"}'
)
DISASSEMBLY = (
    'asm_insns=[{address="0xffffffff81200040",func-name="entry_SYSCALL_64",offset="0",'
    'inst="swapgs"},{address="0xffffffff81200043",func-name="entry_SYSCALL_64",offset="3",'
    'inst="mov    %rsp,%gs:0x6014"},{address="0xffffffff812001b6",'
    'func-name="entry_SYSCALL_64",offset="374",inst="sysretq"}]'
)
STACK = (
    'stack=[frame={level="0",addr="0xffffffff818e0bc0",func="start_kernel",file="init/main.c",'
    'fullname="/src/init/main.c",line="914",arch="i386:x86-64"},frame={level="1",'
    'addr="0xffffffff81000144",func="secondary_startup_64",file="arch/x86/kernel/head_64.S",'
    'line="358",arch="i386:x86-64"}]'
)


def cstring(text: str) -> str:
    """MI c-string for *text*."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def split_args(text: str) -> list[str]:
    """MI arguments: words, or c-strings with backslash escapes."""
    args = []
    for match in re.finditer(r'"((?:[^"\\]|\\.)*)"|(\S+)', text):
        if match.group(2) is not None:
            args.append(match.group(2))
        else:
            args.append(re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), match[1]))
    return args


class FakeGdb:
    def __init__(self) -> None:
        self.running = False
        self.breakpoints: dict[int, str] = {}
        self.next_breakpoint = 1
        self.memory: dict[int, int] = {}
        self.registers = list(REGISTER_VALUES)

    def out(self, *lines: str) -> None:
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def handle(self, token: str, name: str, args: list[str], raw_args: str) -> None:
        if self.running and name not in ("-exec-interrupt", "-target-detach"):
            self.running = False  # the stop lands inside this command's response
            self.out('~"some output\\n"', f'*stopped,reason="breakpoint-hit",bkptno="7",{FRAME},thread-id="1"')
        method = getattr(self, "do_" + name.lstrip("-").replace("-", "_"), None)
        if method is None:
            self.out(f'{token}^error,msg="Undefined MI command: {name[1:]}",code="undefined-command"')
        else:
            method(token, args, raw_args)
        self.out("(gdb) ")

    def do_gdb_set(self, token: str, args: list[str], raw: str) -> None:
        self.out(f"{token}^done")

    do_file_exec_and_symbols = do_gdb_set

    def do_gdb_exit(self, token: str, args: list[str], raw: str) -> None:
        if os.environ.get("FAKE_GDB_HANG"):
            return
        self.out(f"{token}^exit")
        sys.exit(0)

    def do_target_select(self, token: str, args: list[str], raw: str) -> None:
        self.out(
            '=thread-group-started,id="i1",pid="1"',
            '=thread-created,id="1",group-id="i1"',
            '~"0x000000000000fff0 in exception_stacks ()\\n"',
            '*stopped,frame={addr="0x000000000000fff0",func="exception_stacks",args=[],'
            'arch="i386:x86-64"},thread-id="1",stopped-threads="all"',
            f"{token}^connected",
        )

    def do_target_detach(self, token: str, args: list[str], raw: str) -> None:
        if self.running:  # GDB 13 in async mode
            self.out(f'{token}^error,msg="Cannot execute this command while the target is running.\\nUse the '
                     '\\"interrupt\\" command to stop the target\\nand then try again."')
            return
        self.out(
            '=thread-exited,id="1",group-id="i1"',
            '=thread-group-exited,id="i1"',
            '~"[Inferior 1 (process 1) detached]\\n"',
            f"{token}^done",
        )

    def do_exec_continue(self, token: str, args: list[str], raw: str) -> None:
        self.out(f"{token}^running", '*running,thread-id="all"')
        if self.breakpoints:
            number = min(self.breakpoints)
            self.out(
                '~"\\n"', f'~"Breakpoint {number}, start_kernel () at init/main.c:914\\n"',
                f'*stopped,reason="breakpoint-hit",disp="keep",bkptno="{number}",{FRAME},'
                'thread-id="1",stopped-threads="all"',
            )
        else:
            self.running = True

    def do_exec_interrupt(self, token: str, args: list[str], raw: str) -> None:
        self.out(f"{token}^done")
        lose = int(os.environ.get("FAKE_GDB_LOSE_INTERRUPTS", "0"))
        if lose > 0:
            os.environ["FAKE_GDB_LOSE_INTERRUPTS"] = str(lose - 1)
            return
        if self.running:
            self.running = False
            self.out(
                '~"\\nProgram"', '~" received signal SIGINT, Interrupt.\\n"',
                '*stopped,reason="signal-received",signal-name="SIGINT",signal-meaning="Interrupt",'
                f'{FRAME},thread-id="1",stopped-threads="all"',
            )

    def do_exec_step_instruction(self, token: str, args: list[str], raw: str) -> None:
        self.out(
            f"{token}^running", '*running,thread-id="all"',
            '*stopped,reason="end-stepping-range",frame={addr="0xffffffff818e0bc0",'
            'func="start_kernel",args=[],arch="i386:x86-64"},thread-id="1",stopped-threads="all"',
        )

    def do_break_insert(self, token: str, args: list[str], raw: str) -> None:
        hardware, temporary, condition = "-h" in args, "-t" in args, None
        if "-c" in args:
            condition = args[args.index("-c") + 1]
        location = args[-1]
        address = int(location[1:], 0) if location.startswith("*") else SYMBOLS.get(location)
        if address is None:
            self.out(f'{token}^error,msg="Function \\"{location}\\" not defined."')
            return
        number, self.next_breakpoint = self.next_breakpoint, self.next_breakpoint + 1
        self.breakpoints[number] = location
        kind = "hw breakpoint" if hardware else "breakpoint"
        cond = f"cond={cstring(condition)}," if condition is not None else ""
        self.out(
            f'{token}^done,bkpt={{number="{number}",type="{kind}",disp="{"del" if temporary else "keep"}",'
            f'enabled="y",addr="{address:#018x}",func="start_kernel",thread-groups=["i1"],{cond}'
            f'times="0",original-location={cstring(location)}}}'
        )

    def do_break_delete(self, token: str, args: list[str], raw: str) -> None:
        for number in [int(a) for a in args] or list(self.breakpoints):
            self.breakpoints.pop(number, None)
        self.out(f"{token}^done")

    def do_data_evaluate_expression(self, token: str, args: list[str], raw: str) -> None:
        expression = args[0]
        symbol = re.fullmatch(r"\(unsigned long\)&'?([\w.]+)'?", expression)
        if "nosuch" in expression or (symbol and symbol[1] not in SYMBOLS):
            name = symbol[1] if symbol else "nosuch"
            self.out(f'{token}^error,msg="No symbol \\"{name}\\" in current context."')
        elif symbol:
            self.out(f'{token}^done,value="{SYMBOLS[symbol[1]]}"')
        else:
            self.out(f"{token}^done,value={cstring(expression)}")

    def do_data_list_register_names(self, token: str, args: list[str], raw: str) -> None:
        self.out(f"{token}^done,register-names=[{','.join(cstring(n) for n in REGISTER_NAMES)}]")

    def do_data_list_register_values(self, token: str, args: list[str], raw: str) -> None:
        numbers = [int(a) for a in args[1:]] or range(len(self.registers))
        values = ",".join(f'{{number="{n}",value={cstring(self.registers[n])}}}' for n in numbers)
        self.out(f"{token}^done,register-values=[{values}]")

    def do_data_write_register_values(self, token: str, args: list[str], raw: str) -> None:
        for number, value in zip(args[1::2], args[2::2]):
            self.registers[int(number)] = hex(int(value, 0))
        self.out(f"{token}^done")

    def do_data_read_memory_bytes(self, token: str, args: list[str], raw: str) -> None:
        start, size = int(args[0], 0), int(args[1])
        data = bytes(self.memory.get(start + i, i & 0xFF) for i in range(size))
        self.out(
            f'{token}^done,memory=[{{begin="{start:#x}",offset="0x0",end="{start + size:#x}",'
            f'contents="{data.hex()}"}}]'
        )

    def do_data_write_memory_bytes(self, token: str, args: list[str], raw: str) -> None:
        start = int(args[0], 0)
        for i, byte in enumerate(bytes.fromhex(args[1])):
            self.memory[start + i] = byte
        self.out(f"{token}^done")

    def do_data_disassemble(self, token: str, args: list[str], raw: str) -> None:
        self.out(f"{token}^done,{DISASSEMBLY}")

    def do_stack_list_frames(self, token: str, args: list[str], raw: str) -> None:
        self.out(f"{token}^done,{STACK}")

    def do_interpreter_exec(self, token: str, args: list[str], raw: str) -> None:
        command = args[1]
        if command.startswith("bogus"):
            self.out(f'{token}^error,msg="Undefined command: \\"bogus\\".  Try \\"help\\"."')
            return
        self.out('~"You ran: "', f"~{cstring(command)}", '~"\\n"', '&"a log line\\n"', f"{token}^done")

    def do_fake_sleep(self, token: str, args: list[str], raw: str) -> None:
        time.sleep(float(args[0]))
        self.out(f"{token}^done")

    def do_fake_wait_file(self, token: str, args: list[str], raw: str) -> None:
        while not os.path.exists(args[0]):
            time.sleep(0.01)
        self.out(f"{token}^done")

    def do_fake_die(self, token: str, args: list[str], raw: str) -> None:
        sys.stdout.flush()
        os._exit(int(args[0]))

    def do_fake_stderr(self, token: str, args: list[str], raw: str) -> None:
        sys.stderr.write(args[0] + "\n")
        sys.stderr.flush()
        self.out(f"{token}^done")


def main() -> None:
    if os.environ.get("FAKE_GDB_ARGV"):
        with open(os.environ["FAKE_GDB_ARGV"], "w") as argv_file:
            argv_file.write("\n".join(sys.argv[1:]) + "\n")
    if os.environ.get("FAKE_GDB_HANG"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fake = FakeGdb()
    fake.out('=thread-group-added,id="i1"', "(gdb) ")
    for line in sys.stdin:
        match = re.fullmatch(r"(\d*)(-[\w-]+) ?(.*)", line.rstrip("\n"))
        if match is None:
            fake.out(f'^error,msg="Undefined command: {cstring(line.strip())[1:-1]}"', "(gdb) ")
            continue
        token, name, raw_args = match.groups()
        fake.handle(token, name, split_args(raw_args), raw_args)


if __name__ == "__main__":
    main()
