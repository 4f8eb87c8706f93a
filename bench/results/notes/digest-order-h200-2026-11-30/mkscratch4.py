p='/work/main/crates/weightlift-cuda/src/kernels.rs'
s=open(p).read()
old="    order.sort_by_key(|&t| std::cmp::Reverse(tensor_bytes[t]));\n    let mut waves"
assert s.count(old)==1
s=s.replace(old,"    if std::env::var(\"WL_MODEL_ORDER\").is_err() {\n        order.sort_by_key(|&t| std::cmp::Reverse(tensor_bytes[t]));\n    }\n    let mut waves")
open(p,'w').write(s)
p='/work/main/crates/weightlift/src/commands/bench_gpu.rs'
s=open(p).read()
s=s.replace("const CEILING_BYTES", "#[path = \"../../../../.scratch/probe4.rs\"]\nmod probe;\n\nconst CEILING_BYTES",1)
s=s.replace("    let gpus = device_count()?;\n", "    if std::env::var(\"WL_PROBE\").is_ok() {\n        return probe::run(models, model_args);\n    }\n    let gpus = device_count()?;\n",1)
open(p,'w').write(s)
