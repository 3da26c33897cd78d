//! A guest: its memory (a second-level table over 2 MiB frames), its image loaded from the
//! boot archive, the page tables and boot information the hypervisor writes into it, its
//! vCPU, and what happened to it (state, exit counts, console line buffer).

use super::{Backend, BackendError, ExitKind, VcpuSetup};
use crate::frames::{Frames, IDENTITY};
use abi;
use formats::elf;
use morsel::{FrameAlloc, GuestPhysAddr, HostPhysAddr, PageSize, Perm, SecondLevelTable};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Stack space kept free of image segments below the top of guest memory.
const STACK_RESERVE: u64 = 64 * 1024;

/// What the command line asks of a guest.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpec {
    pub name: &'static str,
    pub memory: u64,
    /// Stop the guest after this many preemptions (a CPU-time budget), if set.
    pub max_slices: Option<u64>,
    /// A number handed to the guest in its boot information (`:arg=N`).
    pub arg: u64,
    /// The run counts as a success only if the guest ends this way.
    pub expect: Expect,
}

/// How a guest is expected to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Code(i32),
    /// Stopped by the hypervisor for misbehaving.
    Stopped,
}

/// Where a guest is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Runnable,
    Exited(i32),
    /// Stopped by the hypervisor; the reason was reported when it happened.
    Stopped,
}

/// Why a guest could not be created.
#[derive(Debug)]
pub enum CreateError {
    BadMemorySize(u64),
    NoMemory,
    Image(elf::Error),
    Table(morsel::Error),
    Backend(BackendError),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            CreateError::BadMemorySize(m) => write!(f, "memory size {m:#x} must be a multiple of 2 MiB between 4 MiB and 512 GiB"),
            CreateError::NoMemory => write!(f, "out of host memory"),
            CreateError::Image(e) => write!(f, "bad image: {e}"),
            CreateError::Table(e) => write!(f, "second-level table: {e}"),
            CreateError::Backend(e) => write!(f, "vCPU: {e}"),
        }
    }
}

/// A finished guest: what the final report needs.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub id: u32,
    pub spec: GuestSpec,
    pub state: State,
    pub exits: [u64; ExitKind::COUNT],
}

impl Summary {
    /// Whether the guest ended the way the command line expected.
    pub fn as_expected(&self) -> bool {
        match (self.spec.expect, self.state) {
            (Expect::Code(want), State::Exited(got)) => want == got,
            (Expect::Stopped, State::Stopped) => true,
            _ => false,
        }
    }
}

/// A running guest.
pub struct Guest<B: Backend> {
    pub id: u32,
    pub spec: GuestSpec,
    pub mem: SecondLevelTable<B::Format>,
    pub vcpu: Option<B::Vcpu>,
    pub state: State,
    pub exits: [u64; ExitKind::COUNT],
    /// Morsels mounted in this guest's window.
    pub mounts: alloc::vec::Vec<super::morsels::Mount>,
    line: [u8; 160],
    line_len: usize,
}

impl<B: Backend> Guest<B> {
    /// Builds the guest's memory, loads `image`, and creates its vCPU.
    pub fn create(
        id: u32,
        spec: GuestSpec,
        image: &[u8],
        backend: &mut B,
        frames: &Frames,
    ) -> Result<Self, CreateError> {
        if !spec.memory.is_multiple_of(2 * MIB) || !(4 * MIB..=512 * GIB).contains(&spec.memory) {
            return Err(CreateError::BadMemorySize(spec.memory));
        }
        let image = elf::Image::parse(image, abi::IMAGE_BASE_GPA, spec.memory - STACK_RESERVE)
            .map_err(CreateError::Image)?;
        let mem = SecondLevelTable::<B::Format>::new(frames, &IDENTITY).map_err(CreateError::Table)?;
        let mut g = Guest {
            id,
            spec,
            mem,
            vcpu: None,
            state: State::Runnable,
            exits: [0; ExitKind::COUNT],
            mounts: alloc::vec::Vec::new(),
            line: [0; 160],
            line_len: 0,
        };
        if let Err(e) = g.build(&image, backend, frames) {
            let _ = g.destroy(backend, frames);
            return Err(e);
        }
        Ok(g)
    }

    fn build(&mut self, image: &elf::Image, backend: &mut B, frames: &Frames) -> Result<(), CreateError> {
        for gpa in (0..self.spec.memory).step_by(2 * MIB as usize) {
            let frame = frames.alloc_zeroed(9).ok_or(CreateError::NoMemory)?;
            if let Err(e) = self.mem.map(GuestPhysAddr::new(gpa), frame, PageSize::Size2M, Perm::RWX, frames, &IDENTITY) {
                frames.free(frame, 9);
                return Err(CreateError::Table(e));
            }
        }
        for seg in image.segments() {
            self.write(seg.addr, seg.file);
        }
        self.write_page_tables();
        let mut name = [0u8; 32];
        let n = self.spec.name.len().min(31);
        name[..n].copy_from_slice(&self.spec.name.as_bytes()[..n]);
        let info = abi::BootInfo {
            abi_version: abi::ABI_VERSION,
            guest_id: self.id as u64,
            memory_size: self.spec.memory,
            morsel_window: abi::MORSEL_WINDOW_GPA,
            morsel_window_size: abi::MORSEL_WINDOW_SIZE,
            arg: self.spec.arg,
            name,
            log_level: log::max_level() as u64,
        };
        // SAFETY: BootInfo is plain old data without padding (u64s and a byte array).
        let bytes = unsafe {
            core::slice::from_raw_parts((&raw const info).cast::<u8>(), size_of::<abi::BootInfo>())
        };
        self.write(abi::BOOT_INFO_GPA, bytes);
        let setup = VcpuSetup {
            rip: image.entry,
            rsp: self.spec.memory,
            rdi: abi::BOOT_INFO_GPA,
            cr3: abi::PAGE_TABLES_GPA,
            second_level_root: self.mem.root(),
            id: self.id,
        };
        self.vcpu = Some(backend.create_vcpu(&setup, frames).map_err(CreateError::Backend)?);
        Ok(())
    }

    /// The guest's own page tables: an identity map of guest-physical [0, 4 TiB) with
    /// 1 GiB pages: PML4 slot 0 covers guest RAM (and beyond, where the second-level table
    /// faults), slots 1-7 the morsel window. Nine pages at `PAGE_TABLES_GPA`.
    fn write_page_tables(&mut self) {
        let pml4 = abi::PAGE_TABLES_GPA;
        let slots = 1 + (abi::MORSEL_WINDOW_SIZE / (512 * GIB));
        let mut page = [0u64; 512];
        for slot in 0..slots {
            page[slot as usize] = (pml4 + 0x1000 * (slot + 1)) | 0x3; // present, writable
        }
        self.write(pml4, as_bytes(&page));
        for slot in 0..slots {
            for (j, e) in page.iter_mut().enumerate() {
                *e = ((slot * 512 + j as u64) * GIB) | 0x83; // present, writable, 1 GiB page
            }
            self.write(pml4 + 0x1000 * (slot + 1), as_bytes(&page));
        }
    }

    /// The host-physical address of guest RAM at `gpa` if the guest may access it with
    /// `need` rights; bytes up to the end of that page are contiguous.
    pub fn translate(&self, gpa: u64, need: Perm) -> Option<(HostPhysAddr, u64)> {
        let t = self.mem.translate(GuestPhysAddr::new(gpa), &IDENTITY)?;
        let ok = (!need.read || t.perm.read) && (!need.write || t.perm.write);
        let page_left = t.size.bytes() - (gpa & (t.size.bytes() - 1));
        ok.then_some((t.addr, page_left))
    }

    /// Copies `bytes` into guest memory at `gpa` (hypervisor-internal: the range is known
    /// to be inside guest RAM).
    fn write(&mut self, mut gpa: u64, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let Some((hpa, left)) = self.translate(gpa, Perm::RW) else { return };
            let n = (left as usize).min(bytes.len());
            // SAFETY: hpa..hpa+n is this guest's RAM (translated through its table).
            unsafe { crate::frames::host_bytes_mut(hpa.as_u64(), n) }.copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            gpa += n as u64;
        }
    }

    /// Reads `len` guest bytes at `gpa` into `out`; fails if any byte is outside readable
    /// guest memory. This is how hypercall pointers are validated.
    pub fn read(&self, mut gpa: u64, out: &mut [u8]) -> bool {
        let mut done = 0;
        while done < out.len() {
            let Some((hpa, left)) = self.translate(gpa, Perm::RO) else { return false };
            let n = (left as usize).min(out.len() - done);
            // SAFETY: hpa..hpa+n is this guest's readable memory.
            out[done..done + n].copy_from_slice(unsafe { crate::frames::host_bytes_mut(hpa.as_u64(), n) });
            done += n;
            gpa += n as u64;
        }
        true
    }

    /// Appends console bytes; complete lines are printed with the guest's prefix.
    pub fn console(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || self.line_len == self.line.len() {
                self.flush_line();
            }
            if b != b'\n' {
                self.line[self.line_len] = if b.is_ascii_graphic() || b == b' ' { b } else { b'?' };
                self.line_len += 1;
            }
        }
    }

    fn flush_line(&mut self) {
        let text = core::str::from_utf8(&self.line[..self.line_len]).unwrap_or("");
        crate::println!("[guest {} {}] {}", self.id, self.spec.name, text);
        self.line_len = 0;
    }

    /// Prints a pending partial line.
    pub fn flush_console(&mut self) {
        if self.line_len > 0 {
            self.flush_line();
        }
    }

    /// What is left of the guest after `destroy`.
    pub fn summary(&self) -> Summary {
        Summary { id: self.id, spec: self.spec, state: self.state, exits: self.exits }
    }

    /// Gives everything back: vCPU, guest RAM, tables.
    pub fn destroy(mut self, backend: &mut B, frames: &Frames) -> Summary {
        if let Some(v) = self.vcpu.take() {
            backend.destroy_vcpu(v, frames);
        }
        for gpa in (0..self.spec.memory).step_by(2 * MIB as usize) {
            if let Ok(frame) = self.mem.unmap(GuestPhysAddr::new(gpa), PageSize::Size2M, &IDENTITY) {
                frames.free(frame, 9);
            }
        }
        let summary = self.summary();
        if let Err((_, e)) = self.mem.destroy(frames, &IDENTITY) {
            log::error!(target: "vm", "guest {}: tables not freed: {e}", self.id);
        }
        summary
    }
}

fn as_bytes(words: &[u64; 512]) -> &[u8] {
    // SAFETY: a u64 array is 4096 initialised bytes.
    unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 4096) }
}
