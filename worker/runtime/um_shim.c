/*
 * FaceFarm unified-memory shim: a PyTorch pluggable allocator over cudaMallocManaged, plus
 * cudaMemAdvise / cudaMemPrefetchAsync helpers. Builds with a C compiler alone
 * (cc -shared -fPIC um_shim.c -ldl): the few CUDA runtime prototypes are declared here and
 * libcudart is opened at run time (preferably the copy torch already loaded, see um_init).
 *
 * CUDA 13 changed cudaMemAdvise / cudaMemPrefetchAsync to take a struct cudaMemLocation
 * (and prefetch a flags word) instead of a device int; the runtime version decides the form.
 * Allocations never exceed the device's free memory nor the limit set with um_set_limit.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>

#define UM_EXPORT __attribute__((visibility("default")))

typedef int cudaError_t;
typedef void *cudaStream_t;

/* Mirrors struct cudaMemLocation { enum cudaMemLocationType type; int id; } (8 bytes). */
struct um_mem_location {
    int type;
    int id;
};

enum {
    UM_CUDA_SUCCESS = 0,
    UM_ATTACH_GLOBAL = 1,         /* cudaMemAttachGlobal */
    UM_LOCATION_DEVICE = 1,       /* cudaMemLocationTypeDevice */
    UM_LOCATION_HOST = 2,         /* cudaMemLocationTypeHost */
    UM_CPU_DEVICE_ID = -1,        /* cudaCpuDeviceId */
    UM_ERR_NOT_LOADED = -1000,
    UM_ERR_NO_SYMBOL = -1001,
};

static const size_t UM_FREE_MARGIN = (size_t)256 << 20; /* never leave the card with less */

typedef cudaError_t (*malloc_managed_fn)(void **, size_t, unsigned int);
typedef cudaError_t (*free_fn)(void *);
typedef cudaError_t (*mem_get_info_fn)(size_t *, size_t *);
typedef cudaError_t (*get_device_fn)(int *);
typedef cudaError_t (*set_device_fn)(int);
typedef cudaError_t (*runtime_version_fn)(int *);
typedef cudaError_t (*device_attribute_fn)(int *, int, int);
typedef cudaError_t (*advise_int_fn)(const void *, size_t, int, int);
typedef cudaError_t (*advise_loc_fn)(const void *, size_t, int, struct um_mem_location);
typedef cudaError_t (*prefetch_int_fn)(const void *, size_t, int, cudaStream_t);
typedef cudaError_t (*prefetch_loc_fn)(const void *, size_t, struct um_mem_location, unsigned int, cudaStream_t);

static struct {
    void *lib;
    int version;
    malloc_managed_fn malloc_managed;
    free_fn free;
    mem_get_info_fn mem_get_info;
    get_device_fn get_device;
    set_device_fn set_device;
    device_attribute_fn device_attribute;
    void *advise;   /* advise_int_fn before CUDA 13, advise_loc_fn from 13 */
    void *prefetch; /* prefetch_int_fn before CUDA 13, prefetch_loc_fn from 13 */
} rt;

static pthread_mutex_t um_lock = PTHREAD_MUTEX_INITIALIZER;
static size_t um_outstanding = 0;
static size_t um_limit = 0; /* 0: only the device's free memory limits us */
static int um_last = 0;

static int load_symbols(void *lib) {
    runtime_version_fn get_version = (runtime_version_fn)dlsym(lib, "cudaRuntimeGetVersion");
    rt.malloc_managed = (malloc_managed_fn)dlsym(lib, "cudaMallocManaged");
    rt.free = (free_fn)dlsym(lib, "cudaFree");
    rt.mem_get_info = (mem_get_info_fn)dlsym(lib, "cudaMemGetInfo");
    rt.get_device = (get_device_fn)dlsym(lib, "cudaGetDevice");
    rt.set_device = (set_device_fn)dlsym(lib, "cudaSetDevice");
    rt.device_attribute = (device_attribute_fn)dlsym(lib, "cudaDeviceGetAttribute");
    rt.advise = dlsym(lib, "cudaMemAdvise");
    rt.prefetch = dlsym(lib, "cudaMemPrefetchAsync");
    if (!get_version || !rt.malloc_managed || !rt.free || !rt.mem_get_info || !rt.get_device ||
        !rt.set_device || !rt.device_attribute || !rt.advise || !rt.prefetch) {
        return UM_ERR_NO_SYMBOL;
    }
    int version = 0;
    cudaError_t err = get_version(&version);
    if (err != UM_CUDA_SUCCESS) {
        return err;
    }
    rt.version = version;
    rt.lib = lib;
    return 0;
}

/* Open libcudart (path may be NULL: try the usual sonames). 0 on success. */
UM_EXPORT int um_init(const char *path) {
    static const char *names[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so", NULL};
    int rc = UM_ERR_NOT_LOADED;
    pthread_mutex_lock(&um_lock);
    if (rt.lib) {
        pthread_mutex_unlock(&um_lock);
        return 0;
    }
    if (path && path[0]) {
        void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        rc = lib ? load_symbols(lib) : UM_ERR_NOT_LOADED;
        if (rc != 0 && lib) dlclose(lib);
    } else {
        for (int i = 0; names[i] && rc != 0; i++) {
            void *lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
            if (!lib) lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
            if (!lib) continue;
            rc = load_symbols(lib);
            if (rc != 0) dlclose(lib);
        }
    }
    um_last = rc;
    pthread_mutex_unlock(&um_lock);
    return rc;
}

static int ensure_loaded(void) { return rt.lib ? 0 : um_init(NULL); }

/* cudaRuntimeGetVersion of the loaded runtime (e.g. 13000), or a negative error. */
UM_EXPORT int um_runtime_version(void) {
    int rc = ensure_loaded();
    return rc == 0 ? rt.version : rc;
}

UM_EXPORT int um_last_error(void) { return um_last; }

/* Cap on the bytes of managed memory outstanding through this shim (0 = free memory only). */
UM_EXPORT void um_set_limit(size_t bytes) {
    pthread_mutex_lock(&um_lock);
    um_limit = bytes;
    pthread_mutex_unlock(&um_lock);
}

UM_EXPORT size_t um_outstanding_bytes(void) {
    pthread_mutex_lock(&um_lock);
    size_t n = um_outstanding;
    pthread_mutex_unlock(&um_lock);
    return n;
}

/* cudaDeviceGetAttribute value, or a negative error. */
UM_EXPORT int um_device_attribute(int attribute, int device) {
    int rc = ensure_loaded();
    if (rc != 0) return rc;
    int value = 0;
    cudaError_t err = rt.device_attribute(&value, attribute, device);
    return err == UM_CUDA_SUCCESS ? value : -(int)err;
}

/* The pluggable allocator's alloc: NULL tells PyTorch it is out of memory. */
UM_EXPORT void *um_malloc(size_t size, int device, cudaStream_t stream) {
    (void)stream;
    if (ensure_loaded() != 0) return NULL;
    void *ptr = NULL;
    pthread_mutex_lock(&um_lock);
    int previous = -1;
    rt.get_device(&previous);
    if (previous != device) rt.set_device(device);
    size_t free_bytes = 0, total_bytes = 0;
    cudaError_t err = rt.mem_get_info(&free_bytes, &total_bytes);
    int allowed = err == UM_CUDA_SUCCESS && size + UM_FREE_MARGIN <= free_bytes &&
                  (um_limit == 0 || um_outstanding + size <= um_limit);
    if (allowed) {
        err = rt.malloc_managed(&ptr, size, UM_ATTACH_GLOBAL);
        if (err != UM_CUDA_SUCCESS) {
            ptr = NULL;
        } else {
            um_outstanding += size;
        }
    }
    um_last = err;
    if (previous >= 0 && previous != device) rt.set_device(previous);
    pthread_mutex_unlock(&um_lock);
    return ptr;
}

/* The pluggable allocator's free: (ptr, size, device, stream), as torch's C++ side calls it. */
UM_EXPORT void um_free(void *ptr, size_t size, int device, cudaStream_t stream) {
    (void)device;
    (void)stream;
    if (!ptr || ensure_loaded() != 0) return;
    pthread_mutex_lock(&um_lock);
    um_last = rt.free(ptr);
    um_outstanding = um_outstanding >= size ? um_outstanding - size : 0;
    pthread_mutex_unlock(&um_lock);
}

static struct um_mem_location location_of(int device) {
    struct um_mem_location loc;
    loc.type = device < 0 ? UM_LOCATION_HOST : UM_LOCATION_DEVICE;
    loc.id = device < 0 ? 0 : device;
    return loc;
}

/* cudaMemAdvise(ptr, n, advice, device); device < 0 means the host. Returns the cudaError_t. */
UM_EXPORT int um_advise(const void *ptr, size_t count, int advice, int device) {
    int rc = ensure_loaded();
    if (rc != 0) return rc;
    if (rt.version >= 13000) {
        return ((advise_loc_fn)rt.advise)(ptr, count, advice, location_of(device));
    }
    return ((advise_int_fn)rt.advise)(ptr, count, advice, device < 0 ? UM_CPU_DEVICE_ID : device);
}

/* cudaMemPrefetchAsync(ptr, n, device, stream); device < 0 means the host. Returns the cudaError_t. */
UM_EXPORT int um_prefetch(const void *ptr, size_t count, int device, cudaStream_t stream) {
    int rc = ensure_loaded();
    if (rc != 0) return rc;
    if (rt.version >= 13000) {
        return ((prefetch_loc_fn)rt.prefetch)(ptr, count, location_of(device), 0u, stream);
    }
    return ((prefetch_int_fn)rt.prefetch)(ptr, count, device < 0 ? UM_CPU_DEVICE_ID : device, stream);
}
