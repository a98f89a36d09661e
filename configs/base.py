"""AttnRL training defaults (docs/algorithm.md sections 3 and 11): `python train.py --config=configs/<x>.py`.

Every field carries its unit or meaning. Derived configs import `get_config` from here and change fields.
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.job = "train"  # train | smoke
    c.seed = 0  # sampling and initialisation seed
    c.workdir = "runs/attnrl"  # checkpoints, metrics.jsonl and TensorBoard events go here
    # A run resumed (or a task job rerun) under settings other than its checkpoint's stops naming them
    # (attnrl_jax/run_record.py); comma-separated keys listed here are taken within the run instead:
    # train.steps or a budget (train.max_generated_tokens, max_paths, max_optimizer_steps: extend it), the
    # mesh, sampler.cache_gib, ... (ACCEPTABLE).
    c.accept_changes = ""

    c.model = ConfigDict()
    c.model.preset = ""  # ModelConfig preset name (used when hf_path is empty)
    c.model.hf_path = ""  # Hugging Face Qwen2 directory (config.json + safetensors [+ tokenizer])
    # Parameter storage dtype: float32 | bfloat16. float32 master weights: a bfloat16 weight near 0.02 has a
    # rounding step of about 1e-4, so the paper's 1e-6 updates would round away (the sampler and the
    # reference read a bfloat16 copy).
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"  # compute dtype of activations and matmuls (logits, log-probs are float32)
    c.model.logits_chunk = 512  # tokens per row whose float32 logits exist at once in the loss
    c.model.mlp_chunk = 2048  # tokens per row whose SwiGLU hidden exists at once
    c.model.remat = "full"  # none | full | dots
    c.model.attention_impl = "pallas"  # pallas (GPU/TPU kernels) | xla

    c.tokenizer_path = ""  # tokenizer directory; default: model.hf_path

    c.mesh = ConfigDict()
    c.mesh.data = 1  # data-parallel axis size
    c.mesh.fsdp = -1  # FSDP axis size (-1: all remaining devices)
    c.mesh.tensor = 1  # tensor-parallel axis size

    c.data = ConfigDict()
    c.data.train_path = ""  # verl-format parquet of training problems
    c.data.max_prompt_len = 1024  # tokens; longer prompts are dropped and counted
    c.data.shuffle_seed = 1  # per-epoch shuffle seed

    c.algo = ConfigDict()
    c.algo.preset = (
        "attnrl"  # attnrl | grpo | treerl | treerl_atb | random_branching | ablations (AlgoConfig)
    )
    c.algo.group_size = 6  # G, initial responses per prompt
    c.algo.continuations = 2  # T, continuations per branch point
    # ATB's minimum token distance between branch points (the code's 512-token rule; 0: the paper's rule).
    # Unset (None): the preset's own value (512, or 0 for `paper`); setting it overrides any preset.
    c.algo.token_distance = config_dict.placeholder(int)
    c.algo.fci_delta = 4  # Delta: a step's FCI counts attention from steps at least Delta steps later
    c.algo.fci_buckets = 512  # FCI steps tracked per response (later steps share the last bucket)
    c.algo.initial_batch = 64  # prompts at the first step
    c.algo.target_paths = 1920  # B', training paths wanted per step (adaptive batch size)
    c.algo.adaptive_batch = True  # adapt the prompt batch to target_paths (section 9)
    c.algo.max_batch = 1024  # upper bound of the adaptive prompt batch

    c.sampler = ConfigDict()
    c.sampler.max_new_tokens = 8192  # response length limit, tokens
    c.sampler.temperature = 1.0
    c.sampler.top_p = 1.0
    c.sampler.top_k = 0  # 0: no limit
    # Per-chip memory for the sampler's decode slots (KV cache and per-row state), GiB; a call with more
    # rows than fit batches continuously (a finished row's slot takes the next one). Unset: from the chip,
    # memory_fraction of what it has left after what the run keeps resident while sampling (attnrl_jax/
    # memory.py; 12 GiB on a CPU, which states no limit). 0: all rows at once.
    c.sampler.cache_gib = config_dict.placeholder(float)
    # The share of a chip's free memory (after the resident state) that an unset cache_gib gives the cache;
    # the rest is the sampler program's own working memory. `train.py --compile_only=TARGET` checks it fits.
    c.sampler.memory_fraction = 0.8
    # Positions per KV-cache page: the unit in which a prefix's rows share it and a row takes memory as it
    # generates, and the decode kernel's tile (a power of two of at least 16).
    c.sampler.page_size = 128

    c.loss = ConfigDict()
    c.loss.clip_low = 0.2
    c.loss.clip_high = 0.28
    c.loss.dual_clip = 3.0
    c.loss.kl_coef = 0.001  # 0: no reference model in memory, no reference forward
    c.loss.entropy_coef = 0.0
    c.loss.aggregation = "token_mean"  # token_mean | seq_mean_token_mean
    c.loss.objective = "ppo_clip"  # ppo_clip | reinforce (-A log pi: no ratio, no clip; for comparison)

    c.optim = ConfigDict()
    c.optim.lr = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # constant | cosine

    c.train = ConfigDict()
    c.train.steps = 500  # training steps
    # Budgets for comparing methods at equal cost: stop once this many tokens were sampled, paths trained on
    # or optimizer steps taken (0: no limit; the first one reached stops the run).
    c.train.max_generated_tokens = 0
    c.train.max_paths = 0
    c.train.max_optimizer_steps = 0
    c.train.mini_batch_rows = 192  # training rows per optimizer step (PPO mini-batch; 0: all rows, one step)
    # Rows each device holds per gradient-accumulation micro-batch (0: the whole mini-batch at once). The
    # micro-batch count follows from the mesh: 192 rows on 8 devices are 8 micro-batches of 24 rows, on 32
    # devices 2 of 96; a mini-batch that does not divide the mesh is padded with empty rows, never replicated.
    c.train.rows_per_device = 3
    c.train.row_length = 9216  # prompt + response tokens per training row
    c.train.off_policy = (
        True  # one-step off-policy pipeline (section 10); False: on-policy, two sampler calls
    )
    c.train.recompute_logprobs = False  # True: old log-probs from a forward pass (mismatch is logged)
    # Move the train state (float32 parameters, AdamW moments) to host memory while the sampler runs (it
    # reads its own compute-dtype copy), so the sampler's cache gets that room; back before the update.
    c.train.offload_state = True

    # Held-out evaluations during training (avg@k / pass@k in metrics.jsonl as heldout/*, plotted by the
    # task report): every `every` steps and at the last step, on eval-format parquet files. They measure the
    # policy and never change the run (a resumed run may turn them on or off).
    c.heldout = ConfigDict()
    c.heldout.every = 0  # steps between evaluations (0: none)
    c.heldout.data = ""  # a directory of verl parquet files, or comma-separated files
    c.heldout.k = 4  # samples per problem
    c.heldout.temperature = 0.6  # section 13's evaluation temperature
    c.heldout.max_new_tokens = 0  # 0: sampler.max_new_tokens

    c.reward = ConfigDict()
    c.reward.workers = 0  # verifier processes (0: CPU count)
    c.reward.timeout = 5.0  # seconds per response

    c.ckpt = ConfigDict()
    c.ckpt.every = 10  # steps between checkpoints
    c.ckpt.max_to_keep = 3
    c.ckpt.export = True  # write a Hugging Face directory of the final policy to workdir/export/step_<N>

    # Multi-process runs (attnrl_jax/distributed.py, README "Multi-host"): every process runs one command.
    c.distributed = ConfigDict()
    c.distributed.enabled = "auto"  # auto (coordinator given, TPU pod or SLURM job) | on | off
    c.distributed.coordinator_address = ""  # host:port of process 0 ("": JAX_COORDINATOR_ADDRESS or detected)
    c.distributed.num_processes = 0  # 0: JAX_NUM_PROCESSES, else detected by JAX (TPU pods, SLURM)
    c.distributed.process_id = -1  # -1: JAX_PROCESS_ID, else detected by JAX
    c.distributed.local_device_ids = ""  # comma-separated device ids this process uses ("" = all visible)
    c.distributed.heartbeat_timeout = 100  # seconds without heartbeats before a process counts as dead
    c.distributed.initialization_timeout = 300  # seconds to wait for every process to join
    c.distributed.cpu_collectives = "gloo"  # collectives of the CPU backend (tests); unused on TPU/GPU
    return c
