//! The first instructions: boot headers (multiboot2 for GRUB, the PVH ELF note for QEMU
//! `-kernel`), the 32-bit entry that both loaders jump to, and the switch to long mode.
//!
//! The entry builds an identity map of the first 4 GiB with 2 MiB pages (enough for the
//! image, the boot information and the platform's MMIO), enables PAE, SSE (CR4.OSFXSR,
//! CR4.OSXMMEXCPT, CR0.MP, clear CR0.EM) and long mode, and calls `kmain(magic, info)`
//! on the boot stack. `kmain` tells the two loaders apart by `magic`.

use core::arch::global_asm;

/// Value of eax when GRUB enters through multiboot2 (Multiboot2 spec 3.3).
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
/// First field of the PVH `hvm_start_info` (Xen `arch-x86/hvm/start_info.h`).
pub const PVH_MAGIC: u32 = 0x336e_c578;

/// Size of the boot stack; `kmain` and everything it calls run on it.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .section .multiboot2, "a"
    .balign 8
mb2_header:
    .long 0xe85250d6                      /* multiboot2 magic */
    .long 0                               /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header))
    .balign 8
    .short 0, 0                           /* end tag */
    .long 8
mb2_header_end:

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                               /* name size */
    .long 4                               /* descriptor size */
    .long 18                              /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start32

    .section .bss.boot_tables, "aw", @nobits
    .balign 4096
boot_pml4: .skip 4096
    .global boot_pdpt
boot_pdpt: .skip 4096
boot_pd:   .skip 4 * 4096
    .balign 16
boot_stack: .skip {stack_size}
boot_stack_top:

    .section .rodata
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff              /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff              /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov %eax, %edi                        /* loader magic, first argument of kmain */
    mov %ebx, %esi                        /* boot information, second argument */
    mov $boot_stack_top, %esp

    /* PML4[0] -> PDPT, PDPT[0..4] -> four page directories of 2 MiB pages. */
    mov $boot_pdpt, %eax
    or $3, %eax
    mov %eax, boot_pml4
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add $boot_pd, %eax
    or $3, %eax
    mov %eax, boot_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 1b
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                        /* present, writable, 2 MiB page */
    mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $((1 << 5) | (1 << 9) | (1 << 10)), %eax   /* PAE, OSFXSR, OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xc0000080, %ecx                 /* IA32_EFER */
    rdmsr
    or $((1 << 8) | (1 << 11)), %eax       /* LME, NXE (NPT entries use NX) */
    wrmsr
    mov %cr0, %eax
    and $~(1 << 2), %eax                  /* clear EM: SSE instructions run natively */
    or $((1 << 31) | (1 << 1)), %eax      /* PG, MP */
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    mov %edi, %edi                        /* upper halves are undefined after the switch */
    mov %esi, %esi
    call kmain
3:  cli
    hlt
    jmp 3b
"#,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);
