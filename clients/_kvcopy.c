/* The arena copy kernel: every (slot, layer) piece of one transfer in one call.
 *
 * Loaded with ctypes by tokencake/clients/kv_arena.py, so it needs no Python headers and
 * never touches a Python object; ctypes releases the GIL around the call. The caller has
 * checked every slot, block id and size against the arena and the layers before calling:
 * nothing here bounds-checks, and nothing here can fail.
 *
 * Slot s holds block b of layer l at byte offsets[l]; block b of layer l starts at
 * bases[l] + b * sizes[l]. Pairs are walked in the order given (the caller sorts them by the
 * side being read, so reads go forward through memory).
 */
#include <stdint.h>
#include <string.h>

#define TC_KVCOPY_ABI 1

int tc_kvcopy_abi(void) { return TC_KVCOPY_ABI; }

void tc_copy_layers(uint8_t *arena, int64_t slot_bytes, const int64_t *bases,
                    const int64_t *sizes, const int64_t *offsets, int64_t num_layers,
                    const int64_t *slots, const int64_t *blocks, int64_t num_pairs,
                    int to_arena) {
    for (int64_t i = 0; i < num_pairs; i++) {
        uint8_t *slot = arena + slots[i] * slot_bytes;
        for (int64_t l = 0; l < num_layers; l++) {
            uint8_t *block = (uint8_t *)(intptr_t)bases[l] + blocks[i] * sizes[l];
            /* memmove, not memcpy: a caller may pass layers that alias each other. */
            if (to_arena)
                memmove(slot + offsets[l], block, (size_t)sizes[l]);
            else
                memmove(block, slot + offsets[l], (size_t)sizes[l]);
        }
    }
}
