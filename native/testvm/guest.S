/*
 * Guest code of uffdd-testvm: flat 32-bit protected mode without paging (the
 * default), or 64-bit long mode with an identity map (--long, at the end of
 * this file); no stack use except one counter. It is copied by the VMM to guest-physical
 * TESTVM_CODE_GPA in a small "firmware" memory slot that is not migrated.
 * Everything here runs under KVM's instruction emulator on nested hosts, so the
 * loops are as short as they can be: every page costs about ten instructions.
 *
 * Register contract (set by the VMM with KVM_SET_REGS before entry):
 *   esi  guest-physical base of this vCPU's slice (4 KiB pages)
 *   ecx  number of pages in the slice (> 0)
 *   edx  B = first_page * K + seed32 (mod 2^32): the identifying word of
 *        relative page x is x * K + B, i.e. global_page * K + seed32
 *   edi  fill: global index of the slice's first page
 *        verify_rand: mask = 2^k - 1 with 2^k >= ecx
 *   ebp  verify_rand: LCG start value (< 2^k)
 *   esp  top of a small per-vCPU stack; [esp] = ecx (remaining, verify_rand)
 *
 * Port I/O to the VMM (OUT imm8, eax):
 *   0x10  done; eax = 1 after fill, 2 after verify
 *   0x11  mismatch; eax = relative page index whose word 0 was wrong
 *   0x12  machine check taken; eax = interrupted eip (then hlt)
 */
#define K 0x9E3779B1
#define PORT_DONE 0x10
#define PORT_BAD 0x11
#define PORT_MCE 0x12

	.section .rodata
	.code32
	.globl testvm_guest_start, testvm_guest_end
	.globl testvm_guest_fill, testvm_guest_verify_seq, testvm_guest_verify_rand
	.globl testvm_guest_mce
testvm_guest_start:

/* Write word 0 (identifying word) and word 1 (global page index) of every page. */
testvm_guest_fill:
	xorl	%ebp, %ebp
1:	movl	%ebp, %eax
	imull	$K, %eax, %eax
	addl	%edx, %eax
	movl	%ebp, %ebx
	shll	$12, %ebx
	movl	%eax, (%esi,%ebx)
	leal	(%ebp,%edi), %eax
	movl	%eax, 4(%esi,%ebx)
	incl	%ebp
	cmpl	%ecx, %ebp
	jb	1b
	movl	$1, %eax
	outl	%eax, $PORT_DONE
	hlt
	jmp	.

/* Read word 0 of every page in ascending order and compare. */
testvm_guest_verify_seq:
	xorl	%ebp, %ebp
1:	movl	%ebp, %eax
	imull	$K, %eax, %eax
	addl	%edx, %eax
	movl	%ebp, %ebx
	shll	$12, %ebx
	cmpl	(%esi,%ebx), %eax
	je	2f
	movl	%ebp, %eax
	outl	%eax, $PORT_BAD
2:	incl	%ebp
	cmpl	%ecx, %ebp
	jb	1b
	movl	$2, %eax
	outl	%eax, $PORT_DONE
	hlt
	jmp	.

/*
 * Same in a pseudo-random order: a full-period LCG modulo 2^k (multiplier = 1
 * mod 4, odd increment) visits every value below 2^k exactly once per period;
 * values >= ecx are skipped, so each page is read exactly once.
 */
testvm_guest_verify_rand:
1:	imull	$1103515245, %ebp, %ebp
	addl	$12345, %ebp
	andl	%edi, %ebp
	cmpl	%ecx, %ebp
	jae	1b
	movl	%ebp, %eax
	imull	$K, %eax, %eax
	addl	%edx, %eax
	movl	%ebp, %ebx
	shll	$12, %ebx
	cmpl	(%esi,%ebx), %eax
	je	2f
	movl	%ebp, %eax
	outl	%eax, $PORT_BAD
2:	decl	(%esp)
	jnz	1b
	movl	$2, %eax
	outl	%eax, $PORT_DONE
	hlt
	jmp	.

/* #MC handler (IDT vector 18): report where it hit, then stop this vCPU. */
testvm_guest_mce:
	movl	(%esp), %eax
	outl	%eax, $PORT_MCE
	hlt
	jmp	.

/*
 * 64-bit versions (--long: long mode with identity-mapped 2 MiB pages). Same
 * register contract with the 64-bit registers; 32-bit operations zero-extend,
 * so (%rsi,%rbx) addresses the page. Outside the emulator, a fault on an
 * absent page takes KVM's page-fault path (KVM_EXIT_MEMORY_FAULT).
 */
	.code64
	.globl testvm_guest64_fill, testvm_guest64_verify_seq, testvm_guest64_verify_rand
	.globl testvm_guest64_mce
testvm_guest64_fill:
	xorl	%ebp, %ebp
1:	movl	%ebp, %eax
	imull	$K, %eax, %eax
	addl	%edx, %eax
	movl	%ebp, %ebx
	shll	$12, %ebx
	movl	%eax, (%rsi,%rbx)
	leal	(%rbp,%rdi), %eax
	movl	%eax, 4(%rsi,%rbx)
	incl	%ebp
	cmpl	%ecx, %ebp
	jb	1b
	movl	$1, %eax
	outl	%eax, $PORT_DONE
	hlt
	jmp	.

testvm_guest64_verify_seq:
	xorl	%ebp, %ebp
1:	movl	%ebp, %eax
	imull	$K, %eax, %eax
	addl	%edx, %eax
	movl	%ebp, %ebx
	shll	$12, %ebx
	cmpl	(%rsi,%rbx), %eax
	je	2f
	movl	%ebp, %eax
	outl	%eax, $PORT_BAD
2:	incl	%ebp
	cmpl	%ecx, %ebp
	jb	1b
	movl	$2, %eax
	outl	%eax, $PORT_DONE
	hlt
	jmp	.

testvm_guest64_verify_rand:
1:	imull	$1103515245, %ebp, %ebp
	addl	$12345, %ebp
	andl	%edi, %ebp
	cmpl	%ecx, %ebp
	jae	1b
	movl	%ebp, %eax
	imull	$K, %eax, %eax
	addl	%edx, %eax
	movl	%ebp, %ebx
	shll	$12, %ebx
	cmpl	(%rsi,%rbx), %eax
	je	2f
	movl	%ebp, %eax
	outl	%eax, $PORT_BAD
2:	decl	(%rsp)
	jnz	1b
	movl	$2, %eax
	outl	%eax, $PORT_DONE
	hlt
	jmp	.

testvm_guest64_mce:
	movq	(%rsp), %rax
	outl	%eax, $PORT_MCE
	hlt
	jmp	.

testvm_guest_end:
	.section .note.GNU-stack,"",@progbits
