p='/work/main/crates/weightlift-cuda/src/kernels.rs'
s=open(p).read()
s=s.replace('''// Each listed tensor's digest: xxh64 of its chunk digests''','''extern "C" __global__ void read_all_old(const uint4* p, u64 n16, u64* out) {
    u64 acc = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += (u64)gridDim.x * blockDim.x) {
        uint4 v = p[i];
        acc ^= ((u64)v.x << 32 | v.y) ^ ((u64)v.z << 32 | v.w);
    }
    if (acc == 0x5eed) atomicXor(out, acc);
}
// Each listed tensor's digest: xxh64 of its chunk digests''',1)
s=s.replace("    read_all: CudaFunction,\n","    read_all: CudaFunction,\n    read_all_old: CudaFunction,\n",1)
s=s.replace('            read_all: load("read_all")?,\n','            read_all: load("read_all")?,\n            read_all_old: load("read_all_old")?,\n',1)
s=s.replace("let grid = k.grid_stride_blocks();\n        let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };\n        let (ptr, out) = (buffer.device_ptr(), sink.device_ptr());","let grid = k.sms * std::env::var(\"WL_READ_BPS\").ok().and_then(|v| v.parse().ok()).unwrap_or(32);\n        let old = std::env::var(\"WL_READ_ALL\").map(|v| v == \"old\").unwrap_or(false);\n        let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };\n        let (ptr, out) = (buffer.device_ptr(), sink.device_ptr());",1)
s=s.replace("let mut launch = self.stream().launch_builder(&k.read_all);","let mut launch = self.stream().launch_builder(if old { &k.read_all_old } else { &k.read_all });",1)
s=s.replace("    waves_of(tensor_bytes, WAVE_CHUNKS)","    waves_of(tensor_bytes, std::env::var(\"WL_WAVE_CHUNKS\").ok().and_then(|v| v.parse().ok()).unwrap_or(WAVE_CHUNKS))",1)
s=s.replace("if chunks >= EARLY_FOLD_CHUNKS && !fallback","if chunks >= std::env::var(\"WL_EARLY_FOLD\").ok().and_then(|v| v.parse().ok()).unwrap_or(EARLY_FOLD_CHUNKS) && !fallback",1)
open(p,'w').write(s)
p='/work/main/crates/weightlift/src/commands/bench_gpu.rs'
s=open(p).read()
s=s.replace("const CEILING_BYTES", "#[path = \"../../../../.scratch/probe3.rs\"]\nmod probe;\n\nconst CEILING_BYTES",1)
s=s.replace("    let gpus = device_count()?;\n", "    if std::env::var(\"WL_PROBE\").is_ok() {\n        return probe::run(models, model_args);\n    }\n    let gpus = device_count()?;\n",1)
open(p,'w').write(s)
