"""Score Saliency, Cluster Weights and Apply Pruning."""

from __future__ import annotations

from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..ditprune_core import (
    CALIBRATED_FAMILIES,
    GRANULARITIES,
    METRICS,
    NORMALIZATIONS,
    WITHIN,
    CalibrationError,
    CalibrationStats,
    ClusterParams,
    MetricParams,
    PruneTarget,
    cluster_rows,
    find_prunable_layers,
    iter_masks,
    sparsity_report,
)
from ..ditprune_core.specs import GroupingSpec, SaliencySpec
from ..ditprune_core.util.packing import PackedMask
from ..ditprune_core.util.plots import render, sparsity_by_block_figure, weight_space_figure
from .common import (
    CATEGORY,
    PREFIX,
    CalibrationType,
    ClustersType,
    MaskPatch,
    Progress,
    SaliencyType,
    diffusion_model,
    effective_weight,
    layer_progress,
    pruning_choice,
    pruning_inputs,
    weight_fn_for,
)

_DEFAULT_METRIC = MetricParams()
_DEFAULT_CLUSTERS = ClusterParams()


class DitPruneScoreSaliency(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneScoreSaliency",
            display_name="DiT-Pruning Score Saliency",
            category=CATEGORY,
            description="Chooses how weights are scored. Nothing is computed here: scores are made one layer "
            "at a time when pruning is applied.",
            inputs=[
                io.Combo.Input(
                    "metric",
                    options=list(METRICS),
                    default="energy",
                    tooltip="energy: DiT-Pruning (ours, see README); wanda: |W|·‖X‖; ria; magnitude: |W|.",
                ),
                io.Float.Input(
                    "balance",
                    default=_DEFAULT_METRIC.balance,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="energy only: 0 = weights alone, 1 = activations alone, 0.5 orders rows like Wanda.",
                ),
                io.Combo.Input(
                    "normalize",
                    options=list(NORMALIZATIONS),
                    default=_DEFAULT_METRIC.normalize,
                    tooltip="energy only: make scores shares of their row (or row and column) energy.",
                ),
                io.Float.Input(
                    "ria_power",
                    default=_DEFAULT_METRIC.ria_power,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="ria only: exponent on ‖X‖.",
                ),
                CalibrationType.Input(
                    "calibration",
                    optional=True,
                    tooltip="From Calibrate; every metric but magnitude needs it.",
                ),
            ],
            outputs=[
                SaliencyType.Output(
                    display_name="saliency",
                    tooltip="How to score weights (no scores yet); feed Cluster Weights and Apply Pruning.",
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        metric: str,
        balance: float,
        normalize: str,
        ria_power: float,
        calibration: CalibrationStats | None = None,
    ) -> io.NodeOutput:
        params = MetricParams(balance=balance, normalize=normalize, ria_power=ria_power)
        try:
            spec = SaliencySpec(metric, params, calibration)
        except CalibrationError as exc:
            raise CalibrationError(
                f"{exc}. In ComfyUI: connect Calibrate or Load Calibration to 'calibration'"
            ) from exc
        return io.NodeOutput(spec)


class DitPruneClusterWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneClusterWeights",
            display_name="DiT-Pruning Cluster Weights",
            category=CATEGORY,
            description="Chooses the comparison groups. With 'cluster', output rows are clustered in 2-D weight "
            "space per layer; the picture shows one layer's rows coloured by cluster.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose layer is plotted. It is not changed."),
                io.Combo.Input(
                    "granularity",
                    options=list(GRANULARITIES),
                    default="layer",
                    tooltip="layer (DiT-Pruning default), row (Wanda's), column, or cluster.",
                ),
                io.Int.Input("n_clusters", default=0, min=0, max=16, tooltip="0 chooses k by silhouette."),
                io.Int.Input(
                    "max_clusters",
                    default=_DEFAULT_CLUSTERS.max_clusters,
                    min=1,
                    max=16,
                    tooltip="Largest k tried when n_clusters is 0.",
                ),
                io.Float.Input(
                    "min_silhouette",
                    default=_DEFAULT_CLUSTERS.min_silhouette,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Below this silhouette a layer stays one cluster.",
                ),
                io.Float.Input(
                    "allocation",
                    default=_DEFAULT_CLUSTERS.allocation,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="0: every cluster gets the layer's sparsity; 1: what one layer-wide "
                    "threshold gives it.",
                ),
                io.Combo.Input(
                    "within",
                    options=list(WITHIN),
                    default=_DEFAULT_CLUSTERS.within,
                    tooltip="row: each row of a cluster pruned alike; cluster: compare the whole cluster.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=True,
                    tooltip="KMeans seed.",
                ),
                io.String.Input(
                    "plot_layer",
                    default="single_blocks.0.linear1",
                    tooltip="Layer to plot, e.g. single_blocks.0.linear1 or joint_blocks.0.x_block.attn.qkv.",
                ),
                SaliencyType.Input(
                    "saliency", optional=True, tooltip="Its calibration adds the activation axis to the plot."
                ),
            ],
            outputs=[
                ClustersType.Output(
                    display_name="clusters", tooltip="The comparison groups; feed Apply Pruning."
                ),
                io.Image.Output(
                    display_name="plot",
                    tooltip="plot_layer's output rows in 2-D weight space (axes: log RMS of the row's "
                    "weights, and of its weights seen through the input energy), coloured by cluster.",
                ),
                io.String.Output(
                    display_name="summary",
                    tooltip="plot_layer's k, rows per cluster and silhouette; connect Preview Any to read it.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        granularity: str,
        n_clusters: int,
        max_clusters: int,
        min_silhouette: float,
        allocation: float,
        within: str,
        seed: int,
        plot_layer: str,
        saliency: SaliencySpec | None = None,
    ) -> io.NodeOutput:
        params = ClusterParams(
            n_clusters=n_clusters or None,
            max_clusters=max_clusters,
            min_silhouette=min_silhouette,
            allocation=allocation,
            within=within,
            seed=seed,
        )
        layers = find_prunable_layers(
            diffusion_model(model, action="cluster its weights"),
            families=CALIBRATED_FAMILIES,
        )
        if plot_layer not in layers:
            plot_layer = next(iter(layers))
        stats = saliency.stats if saliency is not None else None
        a = stats[plot_layer].activation_sq_mean if stats is not None and plot_layer in stats else None
        clusters = cluster_rows(effective_weight(model, plot_layer), a, params)
        figure = weight_space_figure(
            clusters.features,
            clusters.labels,
            layer=plot_layer,
            calibrated=a is not None,
            silhouette=clusters.silhouette,
        )
        plot = render(figure)[None]
        text = f"{plot_layer}: k={clusters.k}, rows per cluster {clusters.sizes()}" + (
            f", silhouette {clusters.silhouette:.2f}" if clusters.silhouette is not None else ""
        )
        return io.NodeOutput(GroupingSpec(granularity, params), plot, text)


class DitPruneApplyPruning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneApplyPruning",
            display_name="DiT-Pruning Apply Pruning",
            category=CATEGORY,
            description="Returns a pruned copy of the model: masks go in as weight patches (1 bit per weight), "
            "the incoming model keeps producing dense results.",
            inputs=[
                io.Model.Input("model", tooltip="The model to prune. It is cloned, never changed."),
                SaliencyType.Input("saliency", tooltip="From Score Saliency."),
                *pruning_inputs(),
                ClustersType.Input(
                    "clusters",
                    optional=True,
                    tooltip="From Cluster Weights; default: layer-wide groups (DiT-Pruning default).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="A pruned copy (masks as weight patches); the input is unchanged.",
                ),
                io.String.Output(
                    display_name="report",
                    tooltip="Sparsity per layer and overall; connect Preview Any to read it.",
                ),
                io.Image.Output(
                    display_name="sparsity per block",
                    tooltip="Bar chart: % of weights removed in every transformer block, by block kind, "
                    "with the target as a dashed line.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        saliency: SaliencySpec,
        sparsity: float,
        pattern: str,
        attention: bool,
        mlp: bool,
        single_fused: bool,
        modulation: bool,
        layer_regex: str = "",
        clusters: GroupingSpec | None = None,
    ) -> io.NodeOutput:
        sparsity, families = pruning_choice(sparsity, pattern, attention, mlp, single_fused, modulation)
        config = (clusters or GroupingSpec()).to_config(
            saliency, sparsity, pattern=pattern, families=families, layer_regex=layer_regex
        )
        # resolved once for masks and report
        target = PruneTarget.of(diffusion_model(model, action="prune it"), config)
        pruned = model.clone()
        masks: dict[str, PackedMask] = {}
        for name, keep in iter_masks(
            target,
            saliency.stats,
            config,
            progress=Progress(describe=lambda d, t, name: f"masking {layer_progress(d, t, name)}"),
            weight_fn=weight_fn_for(model),
        ):
            masks[name] = PackedMask.from_bool(keep.cpu())
            del keep
        for name, mask in masks.items():
            pruned.add_patches({f"{PREFIX}{name}.weight": MaskPatch(mask, name)}, 1.0)
        report = sparsity_report(target.module, masks, template=target.template)
        header = f"{saliency.describe()}, {config.granularity} groups, {pattern}, target {sparsity:.0%}\n"
        per_block = report.by("block")
        figure = sparsity_by_block_figure(
            {b: p / n if n else 0.0 for b, (p, n) in per_block.items()},
            target=sparsity,
            title=f"sparsity per block\n{saliency.metric}, {pattern}",
        )
        image = render(figure)[None]
        pruned.model_options["ditprune"] = {
            "config": config.to_dict(),
            "sparsity": report.sparsity,
            "calibration": saliency.stats.summary() if saliency.stats else None,
        }
        return io.NodeOutput(pruned, header + report.to_text(), image)
