// Bounding box and voxel count of a tumor mask, on the device: the GPU twin of
// synthgen._cpu_kernels.mask_bbox. `out` holds (lo0, hi0, lo1, hi1, lo2, hi2, count) as int,
// initialised by the caller to (nx, -1, ny, -1, nz, -1, 0); each thread folds its voxels
// locally and merges them with one atomic per field, so the boxes of all tumors of a batch
// come back to the host in one copy (no synchronisation per tumor).
#include "hash.cuh"

extern "C" __global__ void sg_mask_bbox(const unsigned char* __restrict__ mask, int nx, int ny,
                                        int nz, int* __restrict__ out)
{
    long long total = (long long)nx * ny * nz;
    int lo0 = nx, hi0 = -1, lo1 = ny, hi1 = -1, lo2 = nz, hi2 = -1, count = 0;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        if (!mask[t]) continue;
        int i, j, k;
        sg_unravel3(t, ny, nz, &i, &j, &k);
        lo0 = i < lo0 ? i : lo0; hi0 = i > hi0 ? i : hi0;
        lo1 = j < lo1 ? j : lo1; hi1 = j > hi1 ? j : hi1;
        lo2 = k < lo2 ? k : lo2; hi2 = k > hi2 ? k : hi2;
        ++count;
    }
    if (count == 0) return;
    atomicMin(&out[0], lo0); atomicMax(&out[1], hi0);
    atomicMin(&out[2], lo1); atomicMax(&out[3], hi1);
    atomicMin(&out[4], lo2); atomicMax(&out[5], hi2);
    atomicAdd(&out[6], count);
}
