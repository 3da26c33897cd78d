//! Guest FPU/SSE state. Each backend's world switch does FXSAVE (host) / FXRSTOR (guest)
//! right before entry and the reverse right after exit, inside its assembly, so no compiled
//! code (the precompiled `core` uses SSE) runs between them and clobbers either side. The
//! host's area belongs to the backend instance (one per CPU), the guest's to its vCPU.

/// A 512-byte FXSAVE area (Intel SDM Vol. 1 10.5.1), 16-byte aligned.
#[repr(C, align(16))]
pub struct FpuState([u8; 512]);

impl FpuState {
    /// The state after FNINIT with MXCSR at its reset value (all SSE exceptions masked).
    pub fn initial() -> FpuState {
        let mut s = FpuState([0; 512]);
        s.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes()); // FCW
        s.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        s
    }
}

