/* The kernels' limits and the one struct Python fills, as this build has them.
 *
 * kvlens/kernels/build.py reads these from the loaded library and uses them instead of copies:
 * a Python constant that drifted from the C one (more rows than a buffer holds, a struct field
 * at another offset) would be a silent memory overwrite. kvlens/kernels/layer.py compares its
 * ctypes mirror of kvlens_layer with kvlens_layer_size and kvlens_layer_field, and a library
 * that disagrees is not used.
 */
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

int64_t kvlens_max_rows(void) { return KVLENS_MAX_ROWS; }
int64_t kvlens_single_thread_bytes(void) { return KVLENS_SINGLE_THREAD_BYTES; }
int64_t kvlens_attention_max_group(void) { return KVLENS_ATTENTION_MAX_GROUP; }
int64_t kvlens_attention_max_d_head(void) { return KVLENS_ATTENTION_MAX_D_HEAD; }

/* Floats of scratch kvlens_decode_attention needs. */
int64_t kvlens_decode_attention_scratch(int64_t batch, int64_t n_heads, int64_t n_kv, int64_t d,
                                        int64_t kv_len) {
    return kvlens__attention_scratch(batch, n_heads, n_kv, d, kv_len);
}

/* The size of the team a parallel region asking for `requested` threads gets: `requested` in
 * an OpenMP build (unless OMP_THREAD_LIMIT caps it), 1 in a build without OpenMP. */
int64_t kvlens_openmp_threads(int64_t requested) {
    int64_t got = 1;
    if (requested < 1) requested = 1;
#pragma omp parallel num_threads((int)requested)
    if (omp_get_thread_num() == 0) got = omp_get_num_threads();
    return got;
}

int64_t kvlens_layer_size(void) { return (int64_t)sizeof(kvlens_layer); }

#define FIELD(f) {#f, offsetof(kvlens_layer, f), sizeof(((kvlens_layer *)0)->f)}
static const struct {
    const char *name;
    size_t offset, size;
} layer_fields[] = {
    FIELD(rows),    FIELD(d_model), FIELD(n_heads),     FIELD(n_kv),  FIELD(d_head),
    FIELD(d_mlp),   FIELD(rotary_half), FIELD(pos),     FIELD(s_b),   FIELD(s_h),
    FIELD(s_p),     FIELD(ms_b),    FIELD(cos_row),     FIELD(eps),   FIELD(scale),
    FIELD(adjacent), FIELD(threads), FIELD(layer_norm), FIELD(gated), FIELD(act),
    FIELD(parallel), FIELD(q_qkv),  FIELD(q_o),         FIELD(q_in),  FIELD(q_out),
    FIELD(x),       FIELD(out),     FIELD(ln1_w),       FIELD(ln1_b), FIELD(b_qkv),
    FIELD(b_o),     FIELD(ln2_w),   FIELD(ln2_b),       FIELD(b_in),  FIELD(b_out),
    FIELD(w_qkv),   FIELD(w_o),     FIELD(w_in),        FIELD(w_out),
    FIELD(cos),     FIELD(sin),     FIELD(k_cache),     FIELD(v_cache), FIELD(mask),
    FIELD(work),
};

/* Field i of kvlens_layer in declaration order: its name, with its byte offset and size written
 * to *offset and *size; NULL past the last field. */
const char *kvlens_layer_field(int64_t i, int64_t *offset, int64_t *size) {
    if (i < 0 || i >= (int64_t)(sizeof layer_fields / sizeof layer_fields[0])) return NULL;
    *offset = (int64_t)layer_fields[i].offset;
    *size = (int64_t)layer_fields[i].size;
    return layer_fields[i].name;
}

/* The name of activation `code` (KVLENS_ACT_*), NULL for an unknown code: Python's table of codes
 * (kvlens/kernels/__init__.py ACTIVATIONS) is checked against it before the library is used. */
const char *kvlens_activation_name(int64_t code) {
    static const char *const names[] = {
        [KVLENS_ACT_GELU] = "gelu",
        [KVLENS_ACT_GELU_TANH] = "gelu_tanh",
        [KVLENS_ACT_RELU] = "relu",
        [KVLENS_ACT_SILU] = "silu",
    };
    if (code < 0 || code >= (int64_t)(sizeof names / sizeof names[0])) return NULL;
    return names[code];
}
