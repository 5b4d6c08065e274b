"""The 32-bit ways into the kernel: `int $0x80` (from 64- and 32-bit code), the 32-bit
`syscall` (MSR_CSTAR) and `sysenter` (the MSR_IA32_SYSENTER_* triple), as syscall_init
programs them and as the CPU takes them.

Which instruction a 32-bit process may use depends on the CPU vendor: AMD-style CPUs
take `syscall` in compatibility mode and refuse `sysenter`; Intel-style CPUs the other
way round (and the kernel leaves MSR_CSTAR unwritten there since 6.1.y). QEMU's default
TCG CPU, qemu64, is AMD-style: the sysenter tests ask for an Intel vendor string.
"""

import pytest

from pytest_syscall_irl import roads, x86
from pytest_syscall_irl import KERNEL_STAGES

INTEL = "qemu64,vendor=GenuineIntel"
# Six distinct 32-bit values, so a swapped or dropped argument register cannot pass.
SIX = {i: 0x1111_1111 * (i + 1) for i in range(6)}
ARGV = [f"{SIX[i]:#x}" for i in range(6)]
LOW = 0xFFFF_FFFF
# What the int80 payload holds in the registers the 32-bit ABI does not know across its int $0x80.
HIGH_REGISTERS = {f"r{n}": int(f"{n:x}" * 16, 16) for n in range(8, 16)}
# int $0x80 saves all of pt_regs and IRET gives it back; r8-r11 too since "x86/entry/64/compat:
# Preserve r8-r11 in int $0x80" (4.17; they were zeroed before).
R8_R11_KEPT_SINCE = (4, 17, 0)
HIGH_BITS = 0x5A5A_0000_0000  # in a 64-bit caller's RAX above the i386 number


def _ia32_nr(kernel, name):
    return roads.SyscallNames(kernel.vmlinux, roads.IA32).number(name)


@pytest.fixture
def ia32(kernel):
    """Skips where the kernel has no IA32 emulation (no ia32 handlers, no 32-bit entries)."""
    if not kernel.vmlinux.has_symbol("__ia32_sys_getppid"):
        pytest.skip("kernel built without CONFIG_IA32_EMULATION: no 32-bit syscalls to check")


# One payload run per way (and kernel), shared by the tests that read it: a trace is read-only,
# and the suite's time is a budget. A test run alone (as the fault and mutant checks run
# them) takes its own, with its fault in place.
_SHARED_TRACES = {}


def _shared(kernel, key, take):
    key = (str(kernel.vmlinux.path), key)
    if key not in _SHARED_TRACES:
        _SHARED_TRACES[key] = take()
    return _SHARED_TRACES[key]


def _int80_trace(syscall_trace, kernel, bits):
    """getppid (i386 number) by `int $0x80` from a 64-bit or a 32-bit program, with six arguments."""
    nr = str(_ia32_nr(kernel, "getppid"))
    if bits == 64:
        return _shared(kernel, "int80-64", lambda: syscall_trace.payload("int80", nr, *ARGV, nr="getppid", args=SIX))
    return _shared(kernel, "int80-32", lambda: syscall_trace.payload("compat32", "int80", nr, *ARGV, nr="getppid",
                                                                     args=SIX, at="sirl_int80_insn"))


@pytest.fixture
def int80_trace(request, ia32, syscall_trace, kernel):
    return _int80_trace(syscall_trace, kernel, request.param)


def _fast_trace(syscall_trace, kernel, way, key=None):
    # The vDSO convention (sirl32.h): ebp holds ecx (syscall) or esp (sysenter, sysenter-flags),
    # argument 6 is read from the user stack, so only arguments 0..4 are selected on registers.
    # *key* tells apart a trace taken in another guest variant (boot arguments) of the same way.
    nr = str(_ia32_nr(kernel, "getppid"))
    label = "sirl_syscall_insn" if way == "syscall" else "sirl_sysenter_insn"
    args = {i: SIX[i] for i in (0, 2, 3, 4)}
    return _shared(kernel, key or way, lambda: syscall_trace.payload("compat32", way, nr, *ARGV, nr="getppid",
                                                                     args=args, at=label))


# --- int $0x80 -------------------------------------------------------------------------


def test_idt_vector_0x80_is_the_int80_entry(ia32, kernel, gdb):
    table = kernel.vmlinux.symbol("idt_table")
    gate = x86.decode_idt_gate(gdb.read_memory(table + x86.IDT_GATE_SIZE * x86.IA32_SYSCALL_VECTOR, 16))
    name = roads.INT80.entry_symbol(kernel.vmlinux)
    entry = kernel.vmlinux.symbol(name)
    assert gate.offset == entry, f"IDT[0x80] points at {gate.offset:#x}, expected {name} {entry:#x}"
    assert gate.present and gate.dpl == 3, f"IDT[0x80] present={gate.present} DPL={gate.dpl}: user mode must reach it"
    assert gate.selector == x86.KERNEL_CS, f"IDT[0x80] selector {gate.selector:#x}, expected __KERNEL_CS"


def test_idt_vector_0x80_is_an_interrupt_gate_on_the_thread_stack(ia32, kernel, gdb):
    """SYSG() in arch/x86/kernel/idt.c: an interrupt gate (the CPU clears IF, so the idtentry
    code runs with interrupts off until it has switched GS and stack) and IST 0 (the entry
    moves to the task's stack itself; an IST stack would be shared by every int $0x80)."""
    table = kernel.vmlinux.symbol("idt_table")
    gate = x86.decode_idt_gate(gdb.read_memory(table + x86.IDT_GATE_SIZE * x86.IA32_SYSCALL_VECTOR, 16))
    assert (gate.type, gate.ist) == (x86.GATE_INTERRUPT, 0), (
        f"IDT[0x80] has type {gate.type:#x} and IST {gate.ist}, expected an interrupt gate "
        f"({x86.GATE_INTERRUPT:#x}) on IST 0"
    )


@pytest.mark.parametrize("int80_trace", [64, 32], indirect=True, ids=["from-64-bit", "from-32-bit"])
def test_int80_enters_at_the_gate_in_ring_0(int80_trace, kernel):
    entry = kernel.vmlinux.symbol(roads.INT80.entry_symbol(kernel.vmlinux))
    assert int80_trace["entry"]["rip"] == entry, (
        f"after int $0x80 the CPU is at {int80_trace['entry']['rip']:#x}, expected the int80 entry {entry:#x}"
    )
    for stage in int80_trace.taken(KERNEL_STAGES):
        assert x86.rpl(stage["cs"]) == 0, f"{stage.name}: CS {stage['cs']:#x} has RPL {x86.rpl(stage['cs'])}"


@pytest.mark.parametrize("int80_trace", [64, 32], indirect=True, ids=["from-64-bit", "from-32-bit"])
def test_int80_pt_regs_hold_the_ia32_number_and_arguments(int80_trace, kernel):
    pt_regs, user = int80_trace.dispatch.pt_regs, int80_trace["user"]
    assert pt_regs["cs"] == user["cs"], f"pt_regs->cs {pt_regs['cs']:#x}, expected the caller's CS {user['cs']:#x}"
    assert user["cs"] in (x86.USER_CS, x86.USER32_CS), f"the caller ran with CS {user['cs']:#x}"
    nr = _ia32_nr(kernel, "getppid")
    number = pt_regs["orig_ax"] if pt_regs["orig_ax"] != 2**64 - 1 else pt_regs["ax"]
    assert number & LOW == nr, f"pt_regs holds syscall number {number:#x}, expected i386 getppid {nr}"
    for index, field in enumerate(roads.IA32.pt_regs_args):
        assert pt_regs[field] & LOW == SIX[index], (
            f"pt_regs->{field} {pt_regs[field]:#x}, expected ia32 argument {index} = {SIX[index]:#x}"
        )


def test_int80_keeps_the_32_bit_number_from_a_64_bit_caller(ia32, syscall_trace, kernel):
    """int $0x80 takes EAX: do_int80_emulation stores `regs->ax & GENMASK(31, 0)` in
    orig_ax, so a 64-bit caller's RAX[63:32] (the value only that mask catches) reaches
    neither the dispatch nor a tracer."""
    nr = _ia32_nr(kernel, "getppid")
    trace = syscall_trace.payload("int80", f"{nr | HIGH_BITS:#x}", *ARGV, nr="getppid", args=SIX)
    assert trace["user"]["rax"] == nr | HIGH_BITS, f"the payload made its int $0x80 with RAX {trace['user']['rax']:#x}"
    orig_ax = trace["handler"].pt_regs["orig_ax"]
    assert orig_ax == nr, f"pt_regs->orig_ax {orig_ax:#x} at the handler, expected the 32-bit number {nr:#x}"


@pytest.mark.parametrize("way", [
    "int80", "syscall", pytest.param("sysenter", marks=pytest.mark.syscall_irl_cpu(INTEL)),
])
def test_32_bit_pt_regs_ax_is_enosys_until_the_handler_returns(way, ia32, syscall_trace, kernel):
    """The entries push -ENOSYS as pt_regs->ax (entry_SYSCALL_compat, entry_SYSENTER_compat;
    do_int80_emulation sets it, the gate's code having pushed the number there): what a
    tracer or a skipped call sees until a handler returns."""
    trace = _int80_trace(syscall_trace, kernel, 32) if way == "int80" else _fast_trace(syscall_trace, kernel, way)
    ax = x86.to_signed(trace["handler"].pt_regs["ax"])
    assert ax == -x86.ENOSYS, f"pt_regs->ax {ax} at the handler, expected -ENOSYS ({-x86.ENOSYS})"


@pytest.mark.parametrize("int80_trace", [64, 32], indirect=True, ids=["from-64-bit", "from-32-bit"])
def test_int80_runs_the_ia32_handler_and_returns_in_eax(int80_trace, kernel):
    handler = kernel.vmlinux.symbol("__ia32_sys_getppid")
    assert int80_trace["handler"]["rip"] == handler, (
        f"the CPU ran {int80_trace['handler']['rip']:#x}, expected __ia32_sys_getppid {handler:#x}"
    )
    returned = int80_trace["handler_return"]["rax"] & LOW
    assert int80_trace["user_return"]["rax"] & LOW == returned, (
        f"user EAX {int80_trace['user_return']['rax'] & LOW:#x}, expected the handler's {returned:#x}"
    )
    assert int80_trace.output == f"{returned}\n", f"the program printed {int80_trace.output!r}"
    assert int80_trace.exit == "iret", f"int $0x80 returns by IRET, not {int80_trace.exit}"


@pytest.mark.parametrize("int80_trace", [64, 32], indirect=True, ids=["from-64-bit", "from-32-bit"])
def test_int80_gives_back_every_register_but_eax(int80_trace, kernel, request):
    before, after = int80_trace["user"], int80_trace["user_return"]
    from_64_bit = request.node.callspec.params["int80_trace"] == 64
    kept = ["rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
    if from_64_bit:
        loaded = {name: f"{before[name]:#x}" for name, value in HIGH_REGISTERS.items() if before[name] != value}
        assert not loaded, f"the int80 payload did not load its values before int $0x80: {loaded}"
        kept += [name for name in HIGH_REGISTERS
                 if kernel.version_tuple >= R8_R11_KEPT_SINCE or name not in ("r8", "r9", "r10", "r11")]
    # A 32-bit program sees the low halves only (their upper halves are undefined after a mode switch).
    width = 2**64 - 1 if from_64_bit else LOW
    changed = {name: f"{after[name] & width:#x} (was {before[name] & width:#x})" for name in kept
               if after[name] & width != before[name] & width}
    assert not changed, f"back in user mode after int $0x80 these registers changed: {changed}"
    assert after["rip"] == before["rip"] + 2, (
        f"back in user mode at {after['rip']:#x}, expected the instruction after int $0x80 {before['rip'] + 2:#x}"
    )


# --- syscall_init's MSRs ---------------------------------------------------------------


def test_cstar_is_the_compat_syscall_entry(read_msr, kernel):
    """On the default, AMD-style CPU (Intel-style ones leave CSTAR unwritten)."""
    vmlinux = kernel.vmlinux
    name = next((n for n in ("entry_SYSCALL_compat", "entry_SYSCALL32_ignore", "ignore_sysret")
                 if vmlinux.has_symbol(n)), None)
    assert name is not None, "the kernel has no compat syscall entry and no entry that ignores one"
    cstar = read_msr(x86.MSR_CSTAR)
    assert cstar == vmlinux.symbol(name), f"MSR_CSTAR {cstar:#x}, expected {name} {vmlinux.symbol(name):#x}"


@pytest.mark.syscall_irl_cpu(INTEL)
def test_sysenter_msrs(read_msr, kernel, gdb, syscall_trace):
    vmlinux = kernel.vmlinux
    if not vmlinux.has_symbol("entry_SYSENTER_compat"):
        pytest.skip("kernel without IA32 emulation: syscall_init leaves SYSENTER invalid")
    cs, eip = read_msr(x86.MSR_IA32_SYSENTER_CS), read_msr(x86.MSR_IA32_SYSENTER_EIP)
    assert cs == x86.KERNEL_CS, f"MSR_IA32_SYSENTER_CS {cs:#x}, expected __KERNEL_CS {x86.KERNEL_CS:#x}"
    entry = vmlinux.symbol("entry_SYSENTER_compat")
    assert eip == entry, f"MSR_IA32_SYSENTER_EIP {eip:#x}, expected entry_SYSENTER_compat {entry:#x}"
    # The top of CPU 0's entry stack, which is also its TSS.sp0 (cpu_init: load_sp0).
    per_cpu = int.from_bytes(gdb.read_memory(vmlinux.symbol("__per_cpu_offset"), 8), "little")
    sp0 = int.from_bytes(gdb.read_memory(per_cpu + vmlinux.symbol("cpu_tss_rw") + 4, 8), "little")
    esp = read_msr(x86.MSR_IA32_SYSENTER_ESP)
    assert esp == sp0, f"MSR_IA32_SYSENTER_ESP {esp:#x}, expected the top of CPU 0's entry stack {sp0:#x} (TSS.sp0)"
    # SYSENTER loads RSP from the MSR (Intel SDM, SYSENTER): the CPU's view of it.
    landed = _fast_trace(syscall_trace, kernel, "sysenter")["entry"]["rsp"]
    assert landed == esp, f"RSP right after sysenter {landed:#x}, expected MSR_IA32_SYSENTER_ESP {esp:#x}"


# --- 32-bit syscall and sysenter -------------------------------------------------------


@pytest.mark.parametrize("way", [
    "syscall",
    pytest.param("sysenter", marks=pytest.mark.syscall_irl_cpu(INTEL)),
])
def test_compat_fast_entry(way, ia32, syscall_trace, kernel):
    trace = _fast_trace(syscall_trace, kernel, way)
    road = roads.SYSCALL32 if way == "syscall" else roads.SYSENTER32
    name = road.entry_symbol(kernel.vmlinux)
    assert trace["entry"]["rip"] == kernel.vmlinux.symbol(name), (
        f"after a 32-bit {way} the CPU is at {trace['entry']['rip']:#x}, expected {name}\n{trace}"
    )
    for stage in trace.taken(KERNEL_STAGES):
        assert x86.rpl(stage["cs"]) == 0, f"{stage.name}: CS {stage['cs']:#x} has RPL {x86.rpl(stage['cs'])}"
    pt_regs = trace["handler"].pt_regs
    assert (pt_regs["cs"], pt_regs["ss"]) == (x86.USER32_CS, x86.USER_DS), (
        f"pt_regs cs:ss {pt_regs['cs']:#x}:{pt_regs['ss']:#x}, expected __USER32_CS:__USER_DS"
    )
    assert pt_regs["orig_ax"] & LOW == _ia32_nr(kernel, "getppid"), f"pt_regs->orig_ax {pt_regs['orig_ax']:#x}"
    for index, field in enumerate(roads.IA32.pt_regs_args):
        assert pt_regs[field] & LOW == SIX[index], (
            f"pt_regs->{field} {pt_regs[field]:#x} at the handler, expected ia32 argument {index} = {SIX[index]:#x}"
        )
    returned = trace["handler_return"]["rax"] & LOW
    assert trace.exit == "sysretl", f"an eligible 32-bit {way} returns by SYSRETL, not {trace.exit or '?'}\n{trace}"
    assert trace["dispatch_return"]["rax"] & 0xFF, "do_fast_syscall_32 said IRET for an eligible call"
    assert trace["user_return"]["rax"] & LOW == returned and trace.output == f"{returned}\n", (
        f"user EAX {trace['user_return']['rax'] & LOW:#x}, printed {trace.output!r}, the handler returned {returned:#x}"
    )


@pytest.mark.parametrize("way", [
    "int80",
    "syscall",
    pytest.param("syscall-pti", marks=pytest.mark.syscall_irl_boot_args("pti=on")),
    pytest.param("sysenter", marks=pytest.mark.syscall_irl_cpu(INTEL)),
])
def test_a_32_bit_process_gets_no_kernel_value_in_r8_to_r15(way, ia32, syscall_trace, kernel):
    """execve gives an ia32 process r8..r15 = 0 (elf_common_init) and compatibility mode cannot
    name them, so they are 0 whenever it runs: the exits must not hand it kernel values there.
    SYSRETL takes RFLAGS from r11 and the kernel zeroes r8..r10 before it ("to avoid info
    leaks"); r12..r15 are callee-saved through the C code; IRET restores them all from pt_regs.
    Without PTI, r8..r10 hold whatever the C code left (often 0: a kernel that forgets to zero
    them may pass); with PTI the SYSRETL exit switches CR3 with r8 as its scratch register
    (SWITCH_TO_USER_CR3_NOSTACK; r9 too, but only with PCID, which QEMU's TCG lacks) right
    before zeroing it, so there a forgotten zeroing hands user mode the page-table root every
    time."""
    if way == "int80":
        trace = _int80_trace(syscall_trace, kernel, 32)
    elif way == "syscall-pti":
        if not kernel.vmlinux.has_symbol("pti_init"):
            pytest.skip("kernel built without CONFIG_PAGE_TABLE_ISOLATION")
        trace = _fast_trace(syscall_trace, kernel, "syscall", key=way)
    else:
        trace = _fast_trace(syscall_trace, kernel, way)
    exit_stage = {"sysretl": "sysretl", "iret": "iretq"}.get(trace.exit)
    assert exit_stage in trace, f"a 32-bit {way} left the kernel by {trace.exit or '?'}, not SYSRETL or IRET\n{trace}"
    # The debugger sees r8..r15 only at the exit instruction, still in 64-bit mode (QEMU's
    # gdbstub reports them as 0 while the CPU runs compatibility-mode code).
    stage = trace[exit_stage]
    leaked = {f"r{n}": f"{stage[f'r{n}']:#x}" for n in range(8, 16)
              if stage[f"r{n}"] != 0 and not (exit_stage == "sysretl" and n == 11)}
    assert not leaked, f"at {exit_stage}, about to return to a 32-bit {way} caller, these registers are not 0: {leaked}"


# SYSENTER clears only VM, IF and RF: entry_SYSENTER_compat clears NT and AC itself (a popfq of
# X86_EFLAGS_FIXED when either, or TF, is set: "SYSENTER doesn't filter flags") and DF (cld),
# before any C code runs; pt_regs keeps the caller's flags, which SYSRETL gives back. One flag
# at a time: the popfq clears both NT and AC when either is tested, so with both set a kernel
# that tests only one would pass.
CALLER_FLAGS = {"NT": 1 << 14, "AC": 1 << 18, "DF": 1 << 10}


@pytest.mark.syscall_irl_cpu(INTEL)
@pytest.mark.parametrize("flag", list(CALLER_FLAGS))
def test_sysenter_clears_nt_ac_and_df_before_the_c_code(flag, ia32, syscall_trace, kernel):
    trace = _fast_trace(syscall_trace, kernel, f"sysenter-{flag.lower()}")
    bit = CALLER_FLAGS[flag]

    def flags(value):
        return sorted(name for name, b in CALLER_FLAGS.items() if value & b)

    assert flags(trace["user"]["eflags"]) == [flag], (
        f"the payload did not set {flag} alone before sysenter: EFLAGS {trace['user']['eflags']:#x}"
    )
    for stage in trace.taken((trace.dispatch.name, "handler")):
        assert not stage["eflags"] & bit, (
            f"{stage.name}: RFLAGS {stage['eflags']:#x} still has {flag} the 32-bit caller set before sysenter"
        )
    saved = trace.dispatch.pt_regs["flags"]
    assert flags(saved) == [flag], f"pt_regs->flags {saved:#x} lost the caller's {flag}"
    back = trace["user_return"]["eflags"]
    assert flags(back) == [flag], f"back in user mode EFLAGS {back:#x}, not the caller's"
    assert trace.status == 0 and trace.output == f"{trace['handler_return']['rax'] & LOW}\n", (
        f"the program exited {trace.status} printing {trace.output!r}"
    )


def _any_way_trace(syscall_trace, kernel, way):
    return _int80_trace(syscall_trace, kernel, 32) if way == "int80" else _fast_trace(syscall_trace, kernel, way)


WAYS = ["int80", "syscall", pytest.param("sysenter", marks=pytest.mark.syscall_irl_cpu(INTEL))]
FAST_WAYS = ["syscall", pytest.param("sysenter", marks=pytest.mark.syscall_irl_cpu(INTEL))]


@pytest.mark.parametrize("way", WAYS)
def test_32_bit_entries_clear_user_values_before_the_c_code(way, ia32, syscall_trace, kernel):
    """PUSH_AND_CLEAR_REGS (entry_SYSCALL_compat, entry_SYSENTER_compat; error_entry for the
    int $0x80 gate): once pt_regs holds them, no register keeps a value the caller chose,
    so none can steer speculation in the C code."""
    trace = _any_way_trace(syscall_trace, kernel, way)
    user = set(SIX.values()) | {trace["user"]["rsp"] & LOW}
    stage = trace.dispatch
    kept = {name: f"{stage[name]:#x}" for name in ("rbx", "rcx", "rdx", "rsi", "rbp", *HIGH_REGISTERS)
            if stage[name] & LOW in user}
    assert not kept, f"at {stage.name} these registers still hold the 32-bit caller's values: {kept}"


@pytest.mark.parametrize("way", WAYS)
def test_32_bit_pt_regs_is_at_the_top_of_the_task_stack(way, ia32, syscall_trace, kernel):
    """entry_SYSCALL_compat and entry_SYSENTER_compat load the task's stack top
    (cpu_current_top_of_stack); the gate's error_entry moves pt_regs there (sync_regs):
    where task_pt_regs() (signals, execve, ptrace) expects them."""
    trace = _any_way_trace(syscall_trace, kernel, way)
    vmlinux = kernel.vmlinux
    regs = trace.dispatch["rdi"]
    top = regs + x86.PT_REGS_SIZE + x86.top_of_stack_padding(vmlinux.has_symbol("asm_fred_entrypoint_user"))
    thread_size = x86.thread_size(vmlinux.symbols)
    assert top % thread_size == 0, (
        f"pt_regs at {regs:#x} ({trace.dispatch.name}) ends at {top:#x}, not at the top of a {thread_size:#x}-byte "
        f"task stack"
    )


@pytest.mark.parametrize("way", FAST_WAYS)
def test_compat_pt_regs_hold_the_callers_stack_and_flags(way, ia32, syscall_trace, kernel):
    """entry_SYSCALL_compat pushes ESP (stashed in r8) and EFLAGS (r11); SYSENTER saves
    neither: do_SYSENTER_32 takes ESP from EBP (the vDSO's copy) and sets IF, which
    SYSENTER cleared, so pt_regs describes the caller as a syscall would."""
    trace = _fast_trace(syscall_trace, kernel, way)
    user, pt_regs = trace["user"], trace["handler"].pt_regs
    esp = user["rsp"] & LOW
    assert pt_regs["sp"] == esp, f"pt_regs->sp {pt_regs['sp']:#x}, expected user ESP {esp:#x}"
    # The arithmetic flags are not the kernel's to keep (the vDSO convention clobbers them), and
    # under the tracer's steps QEMU 7.2's TCG lost ZF between SYSENTER and the entry's pushfq,
    # although no instruction between changes a flag (measured: 0x46 at entry, 0x6 pushed).
    system = ~x86.flags("CF", "PF", "AF", "ZF", "SF", "OF")
    assert pt_regs["flags"] & system == user["eflags"] & system, (
        f"pt_regs->flags {pt_regs['flags']:#x}, expected the caller's EFLAGS {user['eflags']:#x} "
        f"(but for the arithmetic flags)"
    )


@pytest.mark.parametrize("way", FAST_WAYS)
def test_compat_fast_exit_gives_back_the_callers_registers(way, ia32, syscall_trace, kernel):
    """sysret32_from_system_call reloads EBX, EDX, ESI, EDI and ESP from pt_regs before
    SYSRETL (ECX and EBP are the vDSO's to restore: it pops them at the landing pad)."""
    trace = _fast_trace(syscall_trace, kernel, way)
    before, after = trace["user"], trace["user_return"]
    assert trace.exit == "sysretl", f"a 32-bit {way} left by {trace.exit or '?'}, not SYSRETL\n{trace}"
    changed = {name: f"{after[name] & LOW:#x} (was {before[name] & LOW:#x})"
               for name in ("rbx", "rdx", "rsi", "rdi", "rsp") if after[name] & LOW != before[name] & LOW}
    assert not changed, f"back in user mode after a 32-bit {way} these registers changed: {changed}"


@pytest.mark.parametrize("way", WAYS)
def test_32_bit_entries_run_on_the_kernel_gs_base_and_give_the_users_back(way, ia32, syscall_trace, kernel, gdb):
    """swapgs on the way in (entry_SYSCALL_compat, entry_SYSENTER_compat; error_entry for the
    gate) and on the way out (before SYSRETL; swapgs_restore_regs_and_return_to_usermode)."""
    trace = _any_way_trace(syscall_trace, kernel, way)
    per_cpu = int.from_bytes(gdb.read_memory(kernel.vmlinux.symbol("__per_cpu_offset"), 8), "little")
    user, stage = trace["user"], trace.dispatch
    assert (stage["gs_base"], stage["k_gs_base"]) == (per_cpu, user["gs_base"]), (
        f"at {stage.name} gs_base {stage['gs_base']:#x}, k_gs_base {stage['k_gs_base']:#x}; expected CPU 0's "
        f"per-CPU base {per_cpu:#x} and the caller's GS base {user['gs_base']:#x}"
    )
    back = trace["user_return"]
    assert (back["gs_base"], back["k_gs_base"]) == (user["gs_base"], per_cpu), (
        f"back in user mode gs_base {back['gs_base']:#x}, k_gs_base {back['k_gs_base']:#x}; expected the "
        f"caller's {user['gs_base']:#x} and {per_cpu:#x} again"
    )
