/* Batched virtual-memory driver calls for vattn's mapper (built by vattn/driver/native.py).
 *
 * Python releases the GIL around each foreign call and takes it back afterwards. A
 * mapper thread that makes its 2 * N driver calls one by one from Python therefore
 * takes the GIL 2 * N times from the serving loop. Through these functions a whole job
 * is one foreign call: the GIL changes hands once.
 *
 * The driver's entry points come in as function pointers (from the process's libcuda),
 * so this file needs neither CUDA headers nor libcuda at build time. Each function is
 * all or nothing, like the Python loops it replaces: after a failure it undoes what the
 * call had done, and reports the failed call, the driver's code, and how many undo calls
 * failed too.
 */
#include <stddef.h>
#include <stdint.h>

typedef int (*map_fn)(uint64_t address, size_t size, size_t offset, uint64_t handle,
                      uint64_t flags);
typedef int (*set_access_fn)(uint64_t address, size_t size, const void *desc,
                             size_t count);
typedef int (*unmap_fn)(uint64_t address, size_t size);

enum { FAILED_NONE = 0, FAILED_MAP = 1, FAILED_SET_ACCESS = 2, FAILED_UNMAP = 3 };

/* Unmap the first `count` pages listed (runs of contiguous pages); returns the number
 * of unmap calls that failed. */
static int64_t unmap_mapped(unmap_fn unmap, size_t page_bytes, const uint64_t *starts,
                            const int64_t *counts, int64_t count) {
    int64_t failures = 0;
    for (int64_t run = 0; count > 0; run++) {
        for (int64_t j = 0; j < counts[run] && count > 0; j++, count--) {
            failures += unmap(starts[run] + (uint64_t)j * page_bytes, page_bytes) != 0;
        }
    }
    return failures;
}

/* Map handles[k] page by page: run r holds counts[r] pages from starts[r] on, and is
 * made accessible with one set-access call once all its pages are mapped. Returns 0,
 * or the driver's code of the first failure with everything this call mapped unmapped
 * again; *failed_call says which call failed, *undo_failures how many unmaps did. */
int vattn_map_runs(map_fn map, set_access_fn set_access, unmap_fn unmap,
                   const void *access_desc, size_t page_bytes, const uint64_t *starts,
                   const int64_t *counts, int64_t num_runs, const uint64_t *handles,
                   int *failed_call, int64_t *undo_failures) {
    int64_t mapped = 0;
    *failed_call = FAILED_NONE;
    *undo_failures = 0;
    for (int64_t run = 0; run < num_runs; run++) {
        for (int64_t j = 0; j < counts[run]; j++) {
            int err = map(starts[run] + (uint64_t)j * page_bytes, page_bytes, 0,
                          handles[mapped], 0);
            if (err != 0) {
                *failed_call = FAILED_MAP;
                *undo_failures = unmap_mapped(unmap, page_bytes, starts, counts, mapped);
                return err;
            }
            mapped++;
        }
        int err = set_access(starts[run], (size_t)counts[run] * page_bytes, access_desc, 1);
        if (err != 0) {
            *failed_call = FAILED_SET_ACCESS;
            *undo_failures = unmap_mapped(unmap, page_bytes, starts, counts, mapped);
            return err;
        }
    }
    return 0;
}

/* Unmap num_pages pages at addresses[k]. Returns 0, or the driver's code of the first
 * failure with every page this call unmapped mapped back (handles[k], made accessible
 * again); *undo_failures counts the map and set-access calls of that undo that failed. */
int vattn_unmap_pages(map_fn map, set_access_fn set_access, unmap_fn unmap,
                      const void *access_desc, size_t page_bytes, const uint64_t *addresses,
                      const uint64_t *handles, int64_t num_pages, int *failed_call,
                      int64_t *undo_failures) {
    *failed_call = FAILED_NONE;
    *undo_failures = 0;
    for (int64_t k = 0; k < num_pages; k++) {
        int err = unmap(addresses[k], page_bytes);
        if (err != 0) {
            *failed_call = FAILED_UNMAP;
            for (int64_t i = 0; i < k; i++) {
                if (map(addresses[i], page_bytes, 0, handles[i], 0) != 0) {
                    ++*undo_failures;
                } else if (set_access(addresses[i], page_bytes, access_desc, 1) != 0) {
                    ++*undo_failures;
                }
            }
            return err;
        }
    }
    return 0;
}
