#!/usr/bin/env bash
# run_all.sh -- every experiment of Wen et al., "Generalization Beyond Data Imbalance: A Controlled Study
# on CLIP for Transferable Insights" (NeurIPS 2024, arXiv 2405.21070), in the paper's order, then
# report.py: figures and report/<mode>/REPORT.md with the paper's claims and our numbers side by side.
#
#   bash run_all.sh --quick              # all sections on the embedded synthetic world (<= 30 min, 2-core CPU)
#   bash run_all.sh                      # paper scale from the data locations below (torchrun, GPUs)
#   bash run_all.sh --quick --only fig8  # one section (repeatable, or a comma list: --only fig3,fig5)
#   bash run_all.sh --dry-run            # print every command as a '+ <command>' line, run nothing
#
# Options
#   --quick          all sections on the synthetic world, sized for a 2-core CPU (the README's main command)
#   --smoke          the whole pipeline at a tiny size (tiny world, one epoch each; used by the tests)
#   (neither)        paper scale: --recipe paper --amp, torchrun --nproc_per_node=$NPROC, real data (below)
#   --dry-run        print the commands ('+ <command>', one a line; '# ...' lines are remarks), run nothing
#   --only S         only section S: fig1 fig3 fig4 fig5 fig6 fig7 fig8 fig9 fig10 (fig9 = fig8); repeatable
#   --out DIR        run folders DIR/<name>_s<seed>/ (default runs/quick, runs/smoke, runs/paper)
#   --report DIR     report.py's output (default report/quick, DIR/report for --smoke, report/paper)
#   --seeds "0 1 2"  seeds of every experiment (default "0 1 2" for --quick, "0" otherwise; the report decides
#                    every claim on mean +- std over the seeds)
#   --data-flags "F" extra data flags for every run, e.g. --data-flags "--profile yfcc15m" (another class-
#                    frequency profile for the IN-Caps-based sections; sections that name their own data, such
#                    as LAIONet's profile or DINO's balanced world, keep it) or "--data-seed 7" (another world)
#   --jobs N         runs at the same time (default: 2 for --quick/--smoke, each on one CPU thread; 1 at
#                    paper scale, where each run is a torchrun over $NPROC GPUs)
#
# Re-running skips finished runs (final.json present) and resumes interrupted ones (--resume when
# checkpoint.pt is present). Two sections that need the same command share one run (a symlink). A failing
# run is logged in DIR/logs/<name>.log and listed at the end; the others go on; the exit status is then 1.
#
# Environment for paper scale (a section whose data is not given is skipped with a message):
#   NPROC=4          processes (GPUs) per run: torchrun --nproc_per_node=$NPROC
#   IMAGENET_VAL     ImageNet val as an ImageFolder (wnid folders): the test set of every CLIP/SL run; Fig. 1b
#   INCAPS_ROOT      ImageNet-Captions: imagenet_captions.json + train/<wnid>/<file> (Fig. 3, 4, 6, 7, 8/9)
#   LAIONET_TSV      LAIONet (threshold 0.7) as a TSV with columns filepath, label, caption (Fig. 4, 5, 10)
#   YFCC_TSV         YFCC-15M-Cls in the same TSV format (Fig. 4)
#   IMAGENET_TRAIN   ImageNet train as an ImageFolder (Fig. 10 / Table 2: DINO's ImageNet row)
#   TRANSFER_ROOT    the linear-probe data sets of Table 2 (layout: dino_tail.py --help, --transfer-root)
#   TRANSFER_TASKS   comma list for dino_tail.py --transfer (default: the Table 2 sets dino_tail.py knows)
#   CLIP_PRETRAINED  Fig. 1b models, space-separated MODEL:TAG:FREQ_PROFILE (default: the paper's open_clip
#                    models with a shipped frequency table); those not in the local weight cache are skipped
#   CLIP_TEXT_INIT   pre-trained CLIP text tower for Fig. 5 / Fig. 8 (default RN50:openai; must be cached)
#   SL_HEAD          frozen class prototypes of Fig. 8/9 (default clip-rn50, the shipped CLIP RN50 head)
#   WORKERS=8        DataLoader workers per process (paper scale)
#   THREADS          OMP_NUM_THREADS of each run (--quick/--smoke default 1: two single-threaded runs use a
#                    2-core CPU far better than one two-threaded run of these small models)
#   PYTHON=python    the interpreter
set -u
{ # the whole script is one block: bash reads all of it before running, so editing it during a run is safe
cd "$(dirname "$0")" || exit 1

SECTIONS=(fig1 fig3 fig4 fig5 fig6 fig7 fig8 fig10)
die() { echo "run_all.sh: error: $*" >&2; exit 2; }

MODE=paper DRY=0 OUT="" REPORT_DIR="" SEEDS=${SEEDS:-} JOBS=${JOBS:-} DATA_FLAGS_TEXT=""
ONLY=()
while (($#)); do
    case $1 in
        --quick) MODE=quick ;;
        --smoke) MODE=smoke ;;
        --paper) MODE=paper ;;
        --dry-run) DRY=1 ;;
        --only | --out | --report | --seeds | --jobs | --data-flags)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --only) IFS=, read -ra parts <<<"$2"; ONLY+=("${parts[@]}") ;;
                --out) OUT=$2 ;;
                --report) REPORT_DIR=$2 ;;
                --seeds) SEEDS=$2 ;;
                --jobs) JOBS=$2 ;;
                --data-flags) DATA_FLAGS_TEXT=$2 ;;
            esac
            shift ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see bash run_all.sh --help)" ;;
    esac
    shift
done
for s in "${ONLY[@]+"${ONLY[@]}"}"; do
    [[ $s == fig9 ]] && s=fig8
    [[ " ${SECTIONS[*]} " == *" $s "* ]] || die "--only $s: unknown section (one of: ${SECTIONS[*]} fig9)"
done
[[ $MODE == quick ]] && SEEDS=${SEEDS:-"0 1 2"}
SEEDS=${SEEDS:-0}
[[ $SEEDS =~ ^[0-9]+( [0-9]+)*$ ]] || die "--seeds must be space-separated integers, got '$SEEDS'"
read -ra DATA_FLAGS <<<"$DATA_FLAGS_TEXT"
for f in "${DATA_FLAGS[@]+"${DATA_FLAGS[@]}"}"; do
    case $f in --out | --seed | --resume) die "--data-flags: $f is not a data flag" ;; esac
done
[[ -z $JOBS || $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$JOBS'"
OUT=${OUT:-runs/$MODE}
case $MODE in
    smoke) REPORT_DIR=${REPORT_DIR:-$OUT/report} ;;
    *) REPORT_DIR=${REPORT_DIR:-report/$MODE} ;;
esac
PY=${PYTHON:-python}

# ---- Sizes of each mode -----------------------------------------------------------------------------
# DATA: the flags every run's data starts from; CLIP / SL / DINO: recipe and size flags of each script.
# --quick is sized so that every experiment learns what it must (report.py's Sanity table: SL, CLIP and the
# text-tower stand-in well above chance, DINO's loss falling and its features beating a random backbone)
# within a 2-core CPU's time; the world is rendered once and cached.
case $MODE in
    quick)
        LAUNCH=("$PY") JOBS=${JOBS:-2} THREADS=${THREADS:-1}
        DATA=(--num-train 16000 --num-test-per-class 20)
        CLIP=(--epochs 4 --batch-size 128 --warmup 20)
        # a 32-image batch, one vocabulary per 16 images (~15 of the 100 classes, as the paper's per-GPU draw
        # holds ~62 of ImageNet's 1,000), so --voc 10 / 20 / 50 act
        SL=(--epochs 6 --batch-size 32 --voc-images 16)
        # DINO: 3,000 images and K = 256 prototypes (~12 images per prototype; the paper: 3.26M for 65,536),
        # the small head and the subsampled vocabulary at K / 4, as Table 2's 16,384 of 65,536
        DINO_DATA=(--num-train 3000)
        DINO=(--epochs 8 --batch-size 64 --lr 0.03 --probe-max-iter 50)
        # the pre-trained text encoder's stand-in: distilled onto CLIP RN50's class embeddings, then an image
        # tower trained against it, frozen, on a balanced world of another data seed (Sec. 3.5)
        TEXTPRE=(--profile uniform --num-train 16000 --num-test-per-class 20 --data-seed 1 --epochs 6 --batch-size 128
                 --warmup 20 --distill-text clip-rn50 --distill-steps 600 --lock-text)
        VOCS=(10 20 50) SCALES=(0.25 0.5 1) OPEN_WORLD=(30 100) TRIM=20 TAIL_VOC=20
        DINO_K=256 DINO_SMALL=64 DINO_VOCS=(64) ;;
    smoke)
        LAUNCH=("$PY") JOBS=${JOBS:-2} THREADS=${THREADS:-1}
        DATA=(--num-train 400 --num-test-per-class 2)
        CLIP=(--epochs 1 --batch-size 64 --warmup 2)
        SL=(--epochs 1 --batch-size 64)
        DINO_DATA=(--num-train 400)
        DINO=(--epochs 1 --batch-size 64 --warmup-epochs 0 --hidden-dim 64 --probe-classes 20
              --probe-train-per-class 5 --probe-test-per-class 2 --probe-max-iter 5)
        TEXTPRE=(--profile uniform --num-train 400 --num-test-per-class 2 --data-seed 1 --epochs 1 --batch-size 64 --warmup 2
                 --distill-text clip-rn50 --distill-steps 3 --lock-text)
        VOCS=(10 20) SCALES=(0.5 1) OPEN_WORLD=(10) TRIM=10 TAIL_VOC=20
        DINO_K=256 DINO_SMALL=64 DINO_VOCS=(64) ;;
    paper)
        NPROC=${NPROC:-4}
        # --standalone: a free rendezvous port per run; one run at a time, since each takes all NPROC GPUs
        LAUNCH=(torchrun --standalone "--nproc_per_node=$NPROC") JOBS=${JOBS:-1} THREADS=${THREADS:-}
        ((JOBS == 1)) || die "--jobs $JOBS: paper runs take all NPROC=$NPROC GPUs each (torchrun); they run one at a time"
        RECIPE=(--recipe paper --amp --workers "${WORKERS:-8}")
        DATA=()
        CLIP=("${RECIPE[@]}") SL=("${RECIPE[@]}") DINO=("${RECIPE[@]}") TEXTPRE=()
        VOCS=(100 200 500) SCALES=(0.125 0.25 0.5 1) OPEN_WORLD=(100 300 900) TRIM=100 TAIL_VOC=100
        DINO_K=65536 DINO_SMALL=16384 DINO_VOCS=(1024 4096 16384) ;;
esac

# ---- The plan: sections append runs; nothing runs until every section is listed -----------------------
NAMES=() CMDS=() PREREQS=() ALIASES=()
declare -A LISTED=() BY_CMD=()
note() { echo "# $*"; }   # a remark; in --dry-run output it never starts with '+'

# quote ARGS...: one shell-safe command line (plain words stay as they are, others get printf %q)
quote() {
    local out="" a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    echo "${out% }"
}

# plan1 NAME NEEDS SCRIPT ARGS...: one run in $OUT/NAME (NEEDS: a file that must exist first, or "").
# A run already planned under the same name is listed once; the same command under another name becomes a
# symlink to the first (e.g. Fig. 6's "no open-world concepts" is Fig. 3's most descriptive captions).
plan1() {
    local name=$1 needs=$2 script=$3
    shift 3
    [[ -n ${LISTED[$name]:-} ]] && return 0
    LISTED[$name]=1
    local key
    key=$(quote "$script" "$@")
    if [[ -n ${BY_CMD[$key]:-} ]]; then
        ALIASES+=("$name=${BY_CMD[$key]}")
        return 0
    fi
    BY_CMD[$key]=$name
    NAMES+=("$name") PREREQS+=("$needs")
    CMDS+=("$(quote "${LAUNCH[@]}" "$script" "$@" --out "$OUT/$name")")
}

# exp NAME SCRIPT ARGS...: one run per seed, NAME_s<seed>. A prerequisite file: REQUIRES=FILE exp ...
# --data-flags go right after the script, so that a section's own data flags (after them) win.
exp() {
    local name=$1 script=$2 s
    shift 2
    for s in $SEEDS; do
        plan1 "${name}_s$s" "${REQUIRES:-}" "$script" "${DATA_FLAGS[@]+"${DATA_FLAGS[@]}"}" "$@" --seed "$s"
    done
}

# Data of each paper-scale source (quick/smoke: the synthetic world, $DATA). The section is skipped when
# a variable is not set: need VAR... prints the message and returns 1.
need() {
    local v missing=()
    for v in "$@"; do [[ -n ${!v:-} ]] || missing+=("$v"); done
    ((${#missing[@]} == 0)) && return 0
    note "skipped $SECTION: set ${missing[*]} (see the top of run_all.sh)"
    return 1
}
incaps() {  # incaps [CLASSES]: IN-Caps on CLASSES (default in1k: all 1000), tested on ImageNet val
    if [[ $MODE == paper ]]; then
        D=(--data incaps --data-root "$INCAPS_ROOT" --val-root "$IMAGENET_VAL" --classes "${1:-in1k}")
    else
        D=("${DATA[@]}")
    fi
}
laionet() {  # LAIONet (threshold 0.7); the synthetic world with LAIONet's class frequencies
    if [[ $MODE == paper ]]; then
        D=(--data tsv --train-file "$LAIONET_TSV" --val-root "$IMAGENET_VAL" --classes in1k)
    else
        D=("${DATA[@]}" --profile laionet-0.7)
    fi
}

# The pre-trained text tower of Fig. 5 and Fig. 8/9 (Sec. 3.5, Appx. C.4), and the frozen class prototypes
# of Fig. 8/9 (Sec. 4.1), from one text encoder, so that CLIP's and SL's arms start from the same text
# knowledge. Paper scale: CLIP RN50's (CLIP_TEXT_INIT RN50:openai, its text tower; SL_HEAD clip-rn50, its
# embeddings of "a {class}"). Quick/smoke: clip_tail.py first distils its text tower onto CLIP RN50's class
# embeddings with captions of all 1,000 ImageNet classes, then trains an image tower against it on a
# balanced world of another data seed; its checkpoint stands in for pre-trained CLIP and its exported
# zero-shot classifier (head.pt) for SL's frozen prototypes.
text_tower() {
    if [[ $MODE == paper ]]; then
        TEXT_INIT=${CLIP_TEXT_INIT:-RN50:openai} TEXT_NEEDS="" HEAD=${SL_HEAD:-clip-rn50} HEAD_NEEDS=""
    else
        local dir=$OUT/clip_textpre_s0
        plan1 clip_textpre_s0 "" clip_tail.py "${TEXTPRE[@]}" --export-head "$dir/head.pt" --seed 0
        TEXT_INIT=$dir/checkpoint.pt TEXT_NEEDS=$dir/final.json
        if [[ -n ${SL_HEAD:-} ]]; then HEAD=$SL_HEAD HEAD_NEEDS=""; else HEAD=$dir/head.pt HEAD_NEEDS=$dir/final.json; fi
    fi
}

# ---- Sections ---------------------------------------------------------------------------------------

# Fig. 4 and Fig. 6 decide no claim yet: --quick / --smoke run them on the first seed only (SEEDS is made
# local to the calling section, so exp sees the shortened list there only).
once_in_quick() {
    [[ $MODE == paper ]] || SEEDS=${SEEDS%% *}
}

# Fig. 1: (a) class-frequency profiles of the pre-training sets -- drawn by report.py from metadata/freqs;
# (b) pre-trained open_clip models: zero-shot accuracy / prediction counts vs their data's frequencies.
section_fig1() {
    note "fig1a: frequency profiles are drawn by report.py from metadata/freqs"
    if [[ $MODE != paper ]]; then
        note "skipped fig1b: pre-trained open_clip models are evaluated at paper scale only (IMAGENET_VAL)"
        return
    fi
    need IMAGENET_VAL || return
    local entries=() missing=() e
    local models=${CLIP_PRETRAINED:-"RN50:yfcc15m:yfcc15m RN50:cc12m:cc12m ViT-B-32:laion400m_e32:laion400m \
ViT-B-32:laion2b_s34b_b79k:laion2b ViT-B-32:metaclip_400m:metaclip-400m ViT-B-32:metaclip_fullcc:metaclip-fullcc"}
    for e in $models; do
        if ((DRY)) || have_weights "${e%%:*}" "$(cut -d: -f2 <<<"$e")"; then entries+=(--pretrained "$e"); else missing+=("$e"); fi
    done
    ((${#missing[@]})) && note "fig1b: weights not in the local cache, skipped: ${missing[*]}"
    ((${#entries[@]})) || { note "skipped fig1b: no pre-trained weights found"; return; }
    # one run folder, one row per model in results.csv
    plan1 fig1_pretrained "" clip_tail.py --eval-only --classes in1k --val-root "$IMAGENET_VAL" "${entries[@]}" \
        --workers "${WORKERS:-8}"
}

# Is an open_clip model's pretrained weight file in the local cache? (never downloads; Fig. 1b)
have_weights() {
    "$PY" - "$1" "$2" <<'EOF' 2>/dev/null
import os, sys
import open_clip
name, tag = sys.argv[1:3]
cfg = open_clip.get_pretrained_cfg(name, tag) or {}
found = os.path.isfile(tag)
if cfg.get("hf_hub") and not found:
    import huggingface_hub
    repo, filename = os.path.split(cfg["hf_hub"])
    for f in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        hit = huggingface_hub.try_to_load_from_cache(repo, f)
        found = found or (isinstance(hit, str) and os.path.isfile(hit))
if cfg.get("url") and not found:
    found = os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"])))
sys.exit(0 if found else 1)
EOF
}

# Fig. 3: (a) CLIP with captions of growing descriptiveness (Sec. 3.2) vs SL with vocabulary
# subsampling (Sec. 3.3): prediction-count correlation with frequency, and accuracy.
section_fig3() {
    [[ $MODE == paper ]] && { need INCAPS_ROOT IMAGENET_VAL || return; }
    local D v
    incaps
    exp clip_template clip_tail.py "${D[@]}" "${CLIP[@]}" --captions template
    exp clip_title clip_tail.py "${D[@]}" "${CLIP[@]}" --captions natural --caption-fields title
    exp clip_title-desc clip_tail.py "${D[@]}" "${CLIP[@]}" --captions natural --caption-fields title,description
    exp clip_title-desc-tags clip_tail.py "${D[@]}" "${CLIP[@]}" --captions natural \
        --caption-fields title,description,tags
    exp sl_voc0 sl_tail.py "${D[@]}" "${SL[@]}" --voc 0
    for v in "${VOCS[@]}"; do exp "sl_voc$v" sl_tail.py "${D[@]}" "${SL[@]}" --voc "$v"; done
}

# Fig. 4: the data distribution (Sec. 3.4): IN-Caps vs LAIONet, LAIONet resampled to IN-Caps'
# frequencies ('=freq'), and (quick) a more diverse LAIONet-like world (the analogue of a lower
# text-definition threshold) / (paper) YFCC-15M-Cls.
section_fig4() {
    local D SEEDS=$SEEDS
    once_in_quick
    if [[ $MODE != paper ]] || need INCAPS_ROOT IMAGENET_VAL; then
        incaps
        exp clip_title-desc-tags clip_tail.py "${D[@]}" "${CLIP[@]}" --captions natural \
            --caption-fields title,description,tags
    fi
    if [[ $MODE != paper ]] || need LAIONET_TSV IMAGENET_VAL; then
        laionet
        exp clip_laionet clip_tail.py "${D[@]}" "${CLIP[@]}"
        exp clip_laionet-freqmatch clip_tail.py "${D[@]}" "${CLIP[@]}" --freq-match incaps
    fi
    if [[ $MODE != paper ]]; then
        laionet
        exp clip_laionet-diverse clip_tail.py "${D[@]}" "${CLIP[@]}" --diversity 1.0
    elif need YFCC_TSV IMAGENET_VAL; then
        exp clip_yfcc clip_tail.py --data tsv --train-file "$YFCC_TSV" --val-root "$IMAGENET_VAL" --classes in1k \
            "${CLIP[@]}"
    fi
}

# Fig. 5: data scale x text encoder (Sec. 3.5): from scratch, pre-trained and frozen, pre-trained and
# fine-tuned, on growing uniform subsets of LAIONet.
# clip_frozen_text F [SUBSET FLAGS]: CLIP with the frozen pre-trained text tower on $D (Fig. 5, and Fig. 7's bar)
clip_frozen_text() {
    local f=$1
    shift
    REQUIRES=$TEXT_NEEDS exp "clip_frozen_frac$f" clip_tail.py "${D[@]}" "${CLIP[@]}" "$@" --text-init "$TEXT_INIT" \
        --lock-text
}

section_fig5() {
    [[ $MODE == paper ]] && { need LAIONET_TSV IMAGENET_VAL || return; }
    local D f frac
    text_tower
    laionet
    for f in "${SCALES[@]}"; do
        frac=(); [[ $f != 1 ]] && frac=(--subset-frac "$f")
        exp "clip_scratch_frac$f" clip_tail.py "${D[@]}" "${CLIP[@]}" "${frac[@]+"${frac[@]}"}"
        clip_frozen_text "$f" "${frac[@]+"${frac[@]}"}"
        REQUIRES=$TEXT_NEEDS exp "clip_finetune_frac$f" clip_tail.py "${D[@]}" "${CLIP[@]}" \
            "${frac[@]+"${frac[@]}"}" --text-init "$TEXT_INIT"
    done
}
# (the scale-1 scratch run is the same command as Fig. 4's clip_laionet, so they share it)

# Fig. 6: open-world concepts (Sec. 3.6): captions also describe N classes outside the evaluated ones.
# Paper scale: ImageNet-Captions-100 plus the other IN-Caps classes as open-world concepts.
section_fig6() {
    [[ $MODE == paper ]] && { need INCAPS_ROOT IMAGENET_VAL || return; }
    local D n SEEDS=$SEEDS
    once_in_quick
    incaps in100
    exp clip_ow0 clip_tail.py "${D[@]}" "${CLIP[@]}" --captions natural --caption-fields title,description,tags
    for n in "${OPEN_WORLD[@]}"; do
        exp "clip_ow$n" clip_tail.py "${D[@]}" "${CLIP[@]}" --captions natural --caption-fields title,description,tags \
            --open-world "$n"
    done
}

# Fig. 7: neural collapse (NC1, NC2) of CLIP vs SL features -- report.py reads the NC metrics every run
# writes; this section lists the runs it compares (shared with Fig. 3 and Fig. 5).
section_fig7() {
    [[ $MODE == paper ]] && { need INCAPS_ROOT IMAGENET_VAL || return; }
    local D
    incaps
    exp clip_template clip_tail.py "${D[@]}" "${CLIP[@]}" --captions template
    exp clip_title-desc-tags clip_tail.py "${D[@]}" "${CLIP[@]}" --captions natural \
        --caption-fields title,description,tags
    exp sl_voc0 sl_tail.py "${D[@]}" "${SL[@]}" --voc 0
    exp "sl_voc${VOCS[1]}" sl_tail.py "${D[@]}" "${SL[@]}" --voc "${VOCS[1]}"
    # the frozen-text-tower bar: Fig. 5's full-scale run (LAIONet)
    if [[ $MODE == paper && -z ${LAIONET_TSV:-} ]]; then
        note "fig7: no CLIP frozen-text run without LAIONET_TSV (the report shows it as missing)"
        return
    fi
    text_tower
    laionet
    clip_frozen_text 1
}

# Fig. 8/9: the extreme long tail (Sec. 4.1): the TRIM rarest classes cut to one shot / zero shots.
# CLIP with a frozen pre-trained text tower, SL, SL + frozen class prototypes, SL + frozen prototypes +
# vocabulary subsampling; tail vs other accuracy (Fig. 8), the head's affinity matrix (Fig. 9a).
section_fig8() {
    [[ $MODE == paper ]] && { need INCAPS_ROOT IMAGENET_VAL || return; }
    local D shots t
    text_tower
    incaps
    for shots in 1 0; do  # (the runs without prerequisites first: they need not wait for the text tower)
        exp "sl_tail$shots" sl_tail.py "${D[@]}" --trim-tail "$TRIM" --tail-shots "$shots" "${SL[@]}" --voc 0
    done
    for shots in 1 0; do
        t=(--trim-tail "$TRIM" --tail-shots "$shots")
        REQUIRES=$TEXT_NEEDS exp "clip-frozen_tail$shots" clip_tail.py "${D[@]}" "${t[@]}" "${CLIP[@]}" \
            --text-init "$TEXT_INIT" --lock-text
        REQUIRES=$HEAD_NEEDS exp "sl-frozen_tail$shots" sl_tail.py "${D[@]}" "${t[@]}" "${SL[@]}" --voc 0 \
            --head frozen --head-file "$HEAD"
        REQUIRES=$HEAD_NEEDS exp "sl-frozen-voc_tail$shots" sl_tail.py "${D[@]}" "${t[@]}" "${SL[@]}" --voc "$TAIL_VOC" \
            --head frozen --head-file "$HEAD"
    done
}

# Fig. 10 / Table 2: DINO (Sec. 4.2) on a balanced set (ImageNet; quick: the uniform synthetic world) and
# on the imbalanced one (LAIONet; quick: the LAIONet-profile world): vanilla K prototypes, a plain smaller
# head, and subsampling V of K prototypes per iteration; linear-probe transfer of the frozen backbone.
section_fig10() {
    [[ -f dino_tail.py ]] || { note "skipped fig10: dino_tail.py is not in this checkout yet"; return; }
    local bal=() imb=() v
    if [[ $MODE == paper ]]; then
        need LAIONET_TSV TRANSFER_ROOT || return
        local tasks=${TRANSFER_TASKS:-fgvc_aircraft,birdsnap,caltech101,stanford_cars,cifar10,cifar100,dtd,flowers102,food101,oxford_pets,sun397,voc2007}
        local probe=(--transfer "$tasks" --transfer-root "$TRANSFER_ROOT")
        imb=(--data tsv --train-file "$LAIONET_TSV" "${probe[@]}")
        if [[ -n ${IMAGENET_TRAIN:-} ]]; then
            bal=(--data imagefolder --data-root "$IMAGENET_TRAIN" "${probe[@]}")
        else
            note "fig10: IMAGENET_TRAIN is not set, the ImageNet row of Table 2 is skipped"
        fi
    else
        bal=("${DINO_DATA[@]}" --profile uniform) imb=("${DINO_DATA[@]}" --profile laionet-0.7)
    fi
    ((${#bal[@]})) && exp dino_balanced dino_tail.py "${bal[@]}" "${DINO[@]}" --prototypes "$DINO_K"
    exp dino_vanilla dino_tail.py "${imb[@]}" "${DINO[@]}" --prototypes "$DINO_K"
    # what pre-training adds: the same probes on a randomly initialised backbone (no pre-training)
    exp dino_random dino_tail.py "${imb[@]}" "${DINO[@]}" --prototypes "$DINO_K" --epochs 0
    exp dino_small-head dino_tail.py "${imb[@]}" "${DINO[@]}" --prototypes "$DINO_SMALL"
    for v in "${DINO_VOCS[@]}"; do
        exp "dino_voc$v" dino_tail.py "${imb[@]}" "${DINO[@]}" --prototypes "$DINO_K" --voc "$v"
    done
}

wanted=" ${ONLY[*]+"${ONLY[*]}"} "
wanted=${wanted// fig9 / fig8 }
selected() { ((${#ONLY[@]} == 0)) || [[ $wanted == *" $1 "* ]]; }
# quick/smoke: the stand-in pre-trained text tower goes first, so the runs that need it never wait for it
if [[ $MODE != paper ]] && { selected fig5 || selected fig8; }; then text_tower; fi
for SECTION in "${SECTIONS[@]}"; do
    selected "$SECTION" && "section_$SECTION"
done
REPORT_CMD=$(quote "$PY" report.py --runs "$OUT" --out "$REPORT_DIR")

# ---- Dry run: the plan ------------------------------------------------------------------------------
if ((DRY)); then
    for i in "${!CMDS[@]}"; do echo "+ ${CMDS[i]}"; done
    for a in "${ALIASES[@]+"${ALIASES[@]}"}"; do note "$OUT/${a%%=*} -> ${a#*=} (same command)"; done
    echo "+ $REPORT_CMD"
    exit 0
fi

# ---- Run it: up to $JOBS runs at a time, in plan order --------------------------------------------------
"$PY" -c "import torch, open_clip, matplotlib" 2>/dev/null \
    || die "'$PY' cannot import torch, open_clip and matplotlib: activate the project's environment" \
           "(. .venv/bin/activate) or set PYTHON"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
[[ -n $THREADS ]] && export OMP_NUM_THREADS=$THREADS
FAILED=() RUNNING=()
declare -A T0=()
total=${#CMDS[@]}
started=$SECONDS
echo "run_all.sh: $total runs ($MODE) into $OUT, $JOBS at a time${THREADS:+, $THREADS thread(s) each}"

progress() {  # progress I TEXT: the line '[i/N] name ... TEXT'
    echo "[$(($1 + 1))/$total] ${NAMES[$1]} ... $2"
}

# finish_one: wait until one running run has ended (its .rc file appears), report it
finish_one() {
    local k i rc log
    while true; do
        for k in "${!RUNNING[@]}"; do
            i=${RUNNING[k]} log=$OUT/logs/${NAMES[${RUNNING[k]}]}.log
            [[ -f $log.rc ]] || continue
            rc=$(<"$log.rc")
            rm -f "$log.rc"
            unset "RUNNING[k]"
            RUNNING=("${RUNNING[@]+"${RUNNING[@]}"}")
            if ((rc == 0)); then
                progress "$i" "ok $((SECONDS - T0[$i]))s"
            else
                progress "$i" "FAILED (exit $rc) $((SECONDS - T0[$i]))s: $(tail -n 2 "$log" | head -n 1)"
                FAILED+=("${NAMES[i]} (exit $rc, log $log)")
            fi
            return
        done
        sleep 1
    done
}

earlier=0
for i in "${!CMDS[@]}"; do
    name=${NAMES[i]} dir=$OUT/${NAMES[i]} log=$OUT/logs/${NAMES[i]}.log
    if [[ -f $dir/final.json || -f $dir/results.json ]]; then
        progress "$i" "done earlier"
        earlier=$((earlier + 1))
        continue
    fi
    # a run that needs another's output waits for the running ones (the producer is among them or done)
    while [[ -n ${PREREQS[i]} && ! -e ${PREREQS[i]} ]] && ((${#RUNNING[@]})); do finish_one; done
    if [[ -n ${PREREQS[i]} && ! -e ${PREREQS[i]} ]]; then
        progress "$i" "FAILED: needs ${PREREQS[i]} (an earlier run failed)"
        FAILED+=("$name (needs ${PREREQS[i]})")
        continue
    fi
    while ((${#RUNNING[@]} >= JOBS)); do finish_one; done
    cmd=${CMDS[i]}
    [[ -f $dir/checkpoint.pt ]] && cmd+=" --resume"
    echo "+ $cmd" >"$log"
    rm -f "$log.rc"
    T0[$i]=$SECONDS
    # the log ends with the CPU time of the run ('times': user and system seconds of its processes)
    (
        eval "$cmd" >>"$log" 2>&1
        rc=$?
        times >"$log.times"  # (a builtin without a pipe: the times of this subshell's children, the run)
        echo "cpu (user, system): $(tail -n 1 "$log.times")" >>"$log"
        rm -f "$log.times"
        echo $rc >"$log.rc"
    ) &
    RUNNING+=("$i")
done
while ((${#RUNNING[@]})); do finish_one; done
for a in "${ALIASES[@]+"${ALIASES[@]}"}"; do  # shared runs: DIR/<name> -> <first name>
    link=$OUT/${a%%=*}
    # an unfinished run folder under the shared name (left by an interrupted --only plan that ran it there)
    # would hide the shared run's result for good: the link replaces it
    [[ -d $link && ! -L $link && ! -f $link/final.json ]] && rm -rf "$link"
    [[ -e $link || -L $link ]] || ln -s "${a#*=}" "$link"
done
elapsed=$((SECONDS - started))
wall="$((elapsed / 60))m$((elapsed % 60))s"
counted="$total runs"
((earlier)) && counted="$((total - earlier)) runs (and $earlier finished earlier)"
REPORT_CMD+=" $(quote --note "run_all.sh --$MODE: $counted ($JOBS at a time) in $wall wall time.")"
echo "+ $REPORT_CMD"
if ! eval "$REPORT_CMD"; then FAILED+=("report.py"); fi
echo "run_all.sh: $counted in $wall; report in $REPORT_DIR/REPORT.md"
if ((${#FAILED[@]})); then
    echo "run_all.sh: ${#FAILED[@]} failed:"
    printf '  %s\n' "${FAILED[@]}"
    exit 1
fi
exit 0
}
