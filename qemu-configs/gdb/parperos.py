# gdb commands that read a guest's memory in a QEMU debugging session (`cargo xtask run
# --gdb`). QEMU's gdbstub translates addresses through the CPU's current page tables only,
# never through nested paging, so `x` on a guest address says "Cannot access memory". These
# commands walk the guest's second-level table (NPT under SVM, EPT under VMX: both use the
# same 4-level layout, present = any of bits 0-2, large page = bit 7) from the root the
# hypervisor records per guest in PARPEROS_GUEST_ROOTS (hypervisor/src/vm/report.rs), and
# read host-physical memory with QEMU's `monitor xp`, which works whatever the CPU runs.
#
#   source qemu-configs/gdb/parperos.py     (needs the hypervisor's symbols loaded)
#   guest-list                              guests with their table root and RAM size
#   guest-pa GUEST GPA                      the host-physical address of GPA
#   guest-x GUEST GPA [COUNT]               COUNT (default 8) u64 words at GPA
#   guest-bytes GUEST GPA [COUNT]           COUNT (default 64) bytes at GPA
#   guest-disas GUEST GPA [COUNT]           COUNT (default 8) instructions at GPA (objdump)
#   $guest_pa(GUEST, GPA)                   for `x/3i $guest_pa(4, $pc)` while the CPU is
#                                           in the hypervisor (it identity-maps all RAM)
#
# Guests use an identity map, so a guest's virtual addresses ($pc, $rsp) are its physical ones.

import re
import subprocess
import tempfile

import gdb

ADDR_MASK = 0x000F_FFFF_FFFF_F000
DEBUG_GUESTS = 256


def _int(value):
    return int(gdb.parse_and_eval(str(value))) & 0xFFFF_FFFF_FFFF_FFFF


def phys_u64s(addr, count):
    """`count` little-endian u64 words of host-physical memory at `addr`."""
    out = gdb.execute("monitor xp /%dgx 0x%x" % (count, addr), to_string=True)
    words = []
    for line in out.splitlines():
        if ":" not in line:
            continue
        words += [int(w, 16) for w in re.findall(r"0x[0-9a-fA-F]+", line.split(":", 1)[1])]
    if len(words) < count:
        raise gdb.GdbError("monitor xp at 0x%x gave %d of %d words: %r" % (addr, len(words), count, out[:200]))
    return words[:count]


def phys_bytes(addr, count):
    out = gdb.execute("monitor xp /%dbx 0x%x" % (count, addr), to_string=True)
    data = []
    for line in out.splitlines():
        if ":" in line:
            data += [int(w, 16) for w in re.findall(r"0x[0-9a-fA-F]+", line.split(":", 1)[1])]
    if len(data) < count:
        raise gdb.GdbError("monitor xp at 0x%x gave %d of %d bytes" % (addr, len(data), count))
    return bytes(data[:count])


def guest_root(guest):
    """(second-level root, RAM bytes) of guest `guest` from PARPEROS_GUEST_ROOTS."""
    if not 0 <= guest < DEBUG_GUESTS:
        raise gdb.GdbError("guest ids 0..%d are recorded" % (DEBUG_GUESTS - 1))
    try:
        table = int(gdb.parse_and_eval("(unsigned long)&PARPEROS_GUEST_ROOTS"))
    except gdb.error:
        raise gdb.GdbError("no symbol PARPEROS_GUEST_ROOTS: load the hypervisor's ELF first")
    root, ram = phys_u64s(table + 16 * guest, 2)
    if root == 0:
        raise gdb.GdbError("guest %d is not loaded (yet)" % guest)
    return root, ram


def translate(guest, gpa):
    """(host-physical address, bytes left in that page) of guest-physical `gpa`."""
    root, _ = guest_root(guest)
    table = root & ADDR_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = phys_u64s(table + ((gpa >> shift) & 0x1FF) * 8, 1)[0]
        if entry & 0x7 == 0:
            raise gdb.GdbError("guest %d: 0x%x is not mapped (level %d entry 0x%x)" % (guest, gpa, level, entry))
        if level == 1 or (level in (2, 3) and entry & 0x80):
            size = 1 << shift
            return (entry & ADDR_MASK & ~(size - 1)) | (gpa & (size - 1)), size - (gpa & (size - 1))
        table = entry & ADDR_MASK
    raise AssertionError("unreachable")


def guest_read(guest, gpa, length):
    data = b""
    while len(data) < length:
        hpa, left = translate(guest, gpa + len(data))
        n = min(left, length - len(data), 4096)
        data += phys_bytes(hpa, n)
    return data


def _args(arg, least, most):
    argv = gdb.string_to_argv(arg)
    if not least <= len(argv) <= most:
        raise gdb.GdbError("wrong number of arguments (see qemu-configs/gdb/parperos.py)")
    return [_int(a) for a in argv]


class GuestList(gdb.Command):
    """guest-list: every recorded guest's second-level table root and RAM size."""

    def __init__(self):
        super().__init__("guest-list", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        table = int(gdb.parse_and_eval("(unsigned long)&PARPEROS_GUEST_ROOTS"))
        words = phys_u64s(table, 2 * DEBUG_GUESTS)
        for guest in range(DEBUG_GUESTS):
            root, ram = words[2 * guest], words[2 * guest + 1]
            if root:
                print("guest %d: table root 0x%x, RAM %d MiB" % (guest, root, ram >> 20))


class GuestPa(gdb.Command):
    """guest-pa GUEST GPA: the host-physical address of guest-physical GPA."""

    def __init__(self):
        super().__init__("guest-pa", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        guest, gpa = _args(arg, 2, 2)
        print("guest %d: 0x%x -> host-physical 0x%x" % (guest, gpa, translate(guest, gpa)[0]))


class GuestX(gdb.Command):
    """guest-x GUEST GPA [COUNT]: COUNT (default 8) u64 words of guest memory at GPA."""

    def __init__(self):
        super().__init__("guest-x", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        guest, gpa, *rest = _args(arg, 2, 3)
        count = rest[0] if rest else 8
        data = guest_read(guest, gpa, 8 * count)
        for i in range(0, count, 2):
            words = [int.from_bytes(data[8 * j:8 * j + 8], "little") for j in range(i, min(i + 2, count))]
            print("0x%x: %s" % (gpa + 8 * i, " ".join("0x%016x" % w for w in words)))


class GuestBytes(gdb.Command):
    """guest-bytes GUEST GPA [COUNT]: COUNT (default 64) bytes of guest memory at GPA."""

    def __init__(self):
        super().__init__("guest-bytes", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        guest, gpa, *rest = _args(arg, 2, 3)
        data = guest_read(guest, gpa, rest[0] if rest else 64)
        for i in range(0, len(data), 16):
            print("0x%x: %s" % (gpa + i, data[i:i + 16].hex(" ")))


class GuestDisas(gdb.Command):
    """guest-disas GUEST GPA [COUNT]: COUNT (default 8) instructions of guest code at GPA."""

    def __init__(self):
        super().__init__("guest-disas", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        guest, gpa, *rest = _args(arg, 2, 3)
        count = rest[0] if rest else 8
        data = guest_read(guest, gpa, 15 * count)
        with tempfile.NamedTemporaryFile(suffix=".bin") as f:
            f.write(data)
            f.flush()
            out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", "-M", "intel",
                                  "--adjust-vma=0x%x" % gpa, f.name], capture_output=True, text=True).stdout
        lines = [l for l in out.splitlines() if re.match(r"^\s+[0-9a-f]+:\t", l)]
        print("\n".join(lines[:count]))


class GuestPaFunction(gdb.Function):
    """$guest_pa(GUEST, GPA): host-physical address of guest-physical GPA."""

    def __init__(self):
        super().__init__("guest_pa")

    def invoke(self, guest, gpa):
        return translate(int(guest), int(gpa) & 0xFFFF_FFFF_FFFF_FFFF)[0]


GuestList()
GuestPa()
GuestX()
GuestBytes()
GuestDisas()
GuestPaFunction()
