# Batch check that guest memory is readable through parperos.py (docs/src/notes/worldswitch.md):
#   cargo xtask run --gdb --timeout 120 --cmdline guests=hello </dev/null &
#   gdb -batch -nx -x qemu-configs/gdb/selftest.gdb target/x86_64-unknown-linux-gnu/release/hypervisor
# Stops at the first world switch (guest 0 is loaded by then), reads guest 0's boot
# information and entry code through its nested table, and exits 1 if either is wrong.
set pagination off
set confirm off
target remote :1234
source qemu-configs/gdb/parperos.py
hbreak svm_world_switch
continue
guest-list
guest-x 0 0x1000 4
guest-disas 0 0x200000 3
python
import gdb, sys
info = guest_read(0, 0x1000, 24)
abi, gid, ram = (int.from_bytes(info[i:i + 8], "little") for i in (0, 8, 16))
code = guest_read(0, 0x200000, 4)
ok = abi == 1 and gid == 0 and ram == guest_root(0)[1] and code == bytes.fromhex("4883e4f0")
print("selftest: BootInfo abi %d, guest %d, RAM 0x%x; entry %s: %s" % (abi, gid, ram, code.hex(), "ok" if ok else "WRONG"))
gdb.execute("kill")
gdb.execute("quit %d" % (0 if ok else 1))
end
