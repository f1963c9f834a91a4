/* libuffdd_fastpath: the daemon's hot loops in C, loaded by uffdd/_fastpath.py with
 * ctypes (which releases the GIL for the whole call). */
#include "frame.h"

__attribute__((visibility("default"))) int uffdd_fp_abi(void)
{
	return FP_ABI_VERSION;
}
