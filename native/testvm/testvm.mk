# uffdd-testvm: the real KVM test VMM (native/testvm/README.md).
# Included by native/Makefile, whose variables it uses: BUILD, CC, CFLAGS,
# STRICT, UFFDD_CPPFLAGS, UFFDD_LIBS (libuffdd.a + msgpack-c), LIBUFFDD_A.
#
#   make -C native testvm            build $(BUILD)/uffdd-testvm
#   make -C native testvm-selftest   quick check on this machine (needs /dev/kvm)

TESTVM      := $(BUILD)/uffdd-testvm
TESTVM_SRCS := testvm/testvm.c testvm/guest.S
TESTVM_DEPS := testvm/fc_standin.c

all: $(TESTVM)

$(TESTVM): $(TESTVM_SRCS) $(TESTVM_DEPS) include/uffdd.h $(LIBUFFDD_A) testvm/testvm.mk
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(STRICT) $(UFFDD_CPPFLAGS) -o $@ $(TESTVM_SRCS) $(UFFDD_LIBS)

.PHONY: testvm testvm-selftest
testvm: $(TESTVM)

testvm-selftest: $(TESTVM)
	$(TESTVM) selftest --memory 64M --vcpus 4
	$(TESTVM) selftest --memory 64M --vcpus 4 --order rand --local-uffd
	$(TESTVM) selftest --memory 64M --vcpus 4 --order rand --local-uffd --exits --backing shmem
