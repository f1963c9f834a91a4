/*
 * uffdd-guest: multiboot v1 entry, AP trampoline and AP entry (see guest.c).
 *
 * The BSP enters at _start in flat 32-bit protected mode (multiboot: eax =
 * 0x2BADB002, ebx = multiboot information). The APs start in real mode at
 * GUEST_TRAMPOLINE (the BSP copies guest_trampoline..guest_trampoline_end
 * there and sends INIT/SIPI), load the guest's GDT and jump to ap_entry32.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-aligned modules, memory information */
#define GUEST_TRAMPOLINE 0x8000

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.code32
	.globl _start
_start:
	cli
	cld
	movl	$bsp_stack_top, %esp
	movl	%eax, %esi
	movl	%ebx, %edi
	lgdtl	guest_gdtr
	ljmpl	$0x08, $1f
1:	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %fs
	movw	%ax, %gs
	movw	%ax, %ss
	pushl	%edi
	pushl	%esi
	call	bsp_main
2:	cli
	hlt
	jmp	2b

/* An AP, in protected mode with the guest's GDT: take an id, a stack, go. */
	.globl ap_entry32
ap_entry32:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %fs
	movw	%ax, %gs
	movw	%ax, %ss
	movl	$1, %eax
	lock xaddl %eax, guest_cpus_up
	cmpl	$8, %eax
	jae	2b
	movl	%eax, %ecx
	incl	%ecx
	shll	$12, %ecx
	leal	ap_stacks(%ecx), %esp
	pushl	%eax
	call	ap_main
	jmp	2b

/* Real-mode AP start code, position-dependent: runs at GUEST_TRAMPOLINE. */
	.code16
	.globl guest_trampoline, guest_trampoline_end
guest_trampoline:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	lgdtl	GUEST_TRAMPOLINE + (tramp_gdtr - guest_trampoline)
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$0x08, $ap_entry32
tramp_gdtr:
	.word	guest_gdt_end - guest_gdt - 1
	.long	guest_gdt
guest_trampoline_end:
	.code32

	.data
	.align 8
guest_gdt:
	.quad	0
	.quad	0x00CF9A000000FFFF	/* 0x08: flat 32-bit code */
	.quad	0x00CF92000000FFFF	/* 0x10: flat data */
guest_gdt_end:
guest_gdtr:
	.word	guest_gdt_end - guest_gdt - 1
	.long	guest_gdt

	.bss
	.align 16
	.globl ap_stacks
ap_stacks:
	.skip	8 * 4096
	.skip	16384
bsp_stack_top:

	.section .note.GNU-stack, "", @progbits
