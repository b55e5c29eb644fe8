"""One RembgService's reconcile: parse -> capabilities -> build -> apply -> prune -> status.

`reconcile` is the full pass (every child applied, what is no longer wanted pruned, status
and Events written); `refresh_status` recomputes status from the Deployments, ScaledObjects
and pods last seen, with no child writes, for watch events that change nothing but readiness
(or KEDA's conditions). Both work on one ServiceState; the controller decides which runs and
when.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import kopf
from pydantic import ValidationError

from rembg_operator import metrics
from rembg_operator.applier import (
    OPTIONAL_GROUPS,
    Applied,
    Applier,
    ApplyOutcome,
    Failed,
    Recreated,
    Unchanged,
    Unserved,
)
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.builders.children import DesiredChildren, Skipped, autoscaler_available
from rembg_operator.events import EventRecorder
from rembg_operator.kube import ApiError, KubeApi
from rembg_operator.models import RembgServiceSpec, semantic_problems
from rembg_operator.pod_health import next_change, pool_findings
from rembg_operator.settings import Settings
from rembg_operator.state import PoolTarget, Record, ServiceState
from rembg_operator.status import (
    Observation,
    PoolObservation,
    ScaledObjectObservation,
    build_status,
    now_utc,
    same_status,
)

ChildIdentity = tuple[str, str, str]  # (apiVersion, kind, name) of a child


class OwnerGoneError(Exception):
    """The RembgService no longer exists (its status cannot be written)."""


@dataclass(frozen=True)
class Outcome:
    result: Literal["ok", "invalid", "failed"]
    errors: tuple[str, ...] = ()
    # A pod finding changes by itself after this many seconds (a probe's grace ends): no
    # watch event says that a container has been not ready for too long.
    recheck_after: float | None = None
    gpu_capacity: int | None = None


class Reconciler:
    def __init__(self, client: KubeApi, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.applier = Applier(client)
        self.events = EventRecorder(client, self.applier.services_first)

    async def reconcile(self, state: ServiceState) -> Outcome:
        ref = ServiceRef(name=state.key[1], namespace=state.key[0])
        generation = int(state.owner["metadata"].get("generation") or 0)
        spec, problems = parse_spec(state.owner.get("spec") or {})
        if spec is None or problems:
            return await self._invalid(state, ref, generation, problems)
        capabilities = await self._capabilities(spec)
        desired = build_children(ref, spec, capabilities)
        kopf.adopt(desired.manifests, owner=kopf.Body(cast("kopf.RawBody", state.owner)))
        outcomes = await self.applier.apply_all(state, desired.manifests)
        inventory, errors, skipped = await self._tally(state, desired, outcomes)
        errors.extend(await self._prune(state, ref, inventory))
        new_generation = state.status.get("observedGeneration") != generation
        state.record = _record(
            ref,
            spec,
            desired,
            capabilities,
            generation=generation,
            inventory=inventory,
            errors=errors,
            skipped=skipped,
        )
        recheck = await self.refresh_status(state)
        await self._outcome_events(
            state,
            spec=spec,
            capabilities=capabilities,
            generation=generation,
            errors=errors,
            new_generation=new_generation,
        )
        return Outcome(
            "failed" if errors else "ok", tuple(errors), recheck, capabilities.gpu_capacity
        )

    async def refresh_status(self, state: ServiceState) -> float | None:
        """Write status if it changed; returns when a pod finding will change by itself."""
        record = state.record
        assert record is not None, "a status refresh follows a full reconcile"
        now = now_utc()
        pods = list(state.pods.values())
        findings = {
            target.pool: pool_findings((p for p in pods if p.pool == target.pool), now)
            for target in record.pools
        }
        observation = _observation(
            record,
            [
                PoolObservation.from_deployment(
                    target.pool,
                    state.deployments.get(target.deployment),
                    required=target.required,
                    minimum=target.minimum,
                    findings=findings[target.pool],
                    scaled_object=_scaled_object(state, target),
                )
                for target in record.pools
            ],
        )
        status = build_status(observation, state.status, now)
        if same_status(state.status, status):
            metrics.RECONCILES.labels(kind="status", result="unchanged").inc()
        else:
            await self.applier.services_first.turn()
            try:
                await self.client.patch_status(*state.key, merge_patch(state.status, status))
            except ApiError as error:
                if error.not_found:
                    raise OwnerGoneError(f"{state.key[0]}/{state.key[1]}") from error
                raise
            state.status = status
            metrics.RECONCILES.labels(kind="status", result="written").inc()
        everything = [f for found in findings.values() for f in found]
        await self.events.pod_findings(state, everything)
        return next_change(everything)

    async def _tally(
        self, state: ServiceState, desired: DesiredChildren, outcomes: list[ApplyOutcome]
    ) -> tuple[list[ChildIdentity], list[str], list[Skipped]]:
        """The inventory, errors and skipped children of one pass's applies.

        Everything wanted stays in the inventory, applied or not: a child that failed to
        apply this time must never be pruned because of it.
        """
        inventory: list[ChildIdentity] = []
        errors: list[str] = []
        skipped = list(desired.skipped)
        for manifest, outcome in zip(desired.manifests, outcomes, strict=True):
            identity = (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])
            match outcome:
                case Unserved(skipped=why):
                    skipped.append(why)
                    continue
                case Recreated(message=message):
                    await self.events.once(state, "Recreated", message, warning=True)
                case Failed(problem=problem):
                    errors.append(problem)
                case Applied() | Unchanged():
                    pass
            inventory.append(identity)
        return inventory, errors, skipped

    async def _prune(
        self, state: ServiceState, ref: ServiceRef, inventory: list[ChildIdentity]
    ) -> list[str]:
        """Delete children that an earlier reconcile applied and this one did not."""
        wanted = set(inventory)
        errors: list[str] = []
        for item in state.status.get("inventory") or []:
            entry = (item.get("apiVersion", ""), item.get("kind", ""), item.get("name", ""))
            # The inventory is read back from status, which anyone may edit: only names this
            # service's children can have are ever deleted.
            if entry in wanted or not ref.may_own(entry[2]):
                continue
            try:
                await self.client.delete(entry[0], entry[1], ref.namespace, entry[2])
            except ApiError as error:
                if error.status != 404:
                    # Kept in the inventory, so the retry deletes it again.
                    errors.append(f"delete {entry[1]} {entry[2]}: {error.message}")
                    inventory.append(entry)
                    continue
            except KeyError:
                continue  # a kind this operator version does not know
            state.forget_child((entry[1], ref.namespace, entry[2]))
        return errors

    async def _capabilities(self, spec: RembgServiceSpec) -> Capabilities:
        ttl = self.settings.discovery_ttl_seconds
        monitoring = spec.monitoring.enabled and await self.client.serves(
            "monitoring.coreos.com/v1", OPTIONAL_GROUPS["monitoring.coreos.com/v1"], ttl
        )
        keda = spec.autoscaling.engine == "keda" and await self.client.serves(
            "keda.sh/v1alpha1", OPTIONAL_GROUPS["keda.sh/v1alpha1"], ttl
        )
        capacity = None
        if spec.gpu is not None:
            capacity = await self.client.gpu_capacity(self.settings.gpu_capacity_ttl_seconds)
        return Capabilities(prometheus_operator=monitoring, keda=keda, gpu_capacity=capacity)

    async def _invalid(
        self, state: ServiceState, ref: ServiceRef, generation: int, problems: list[str]
    ) -> Outcome:
        """Report the problems; touch no child (the last valid spec's children keep serving)."""
        previous = state.record or Record(generation=generation, endpoint=ref.endpoint)
        if not previous.pools:
            previous = replace(previous, pools=_pools_from_status(state.status, ref))
        state.record = replace(
            previous, generation=generation, spec_problems=tuple(problems), apply_errors=()
        )
        recheck = await self.refresh_status(state)
        await self.events.once(state, "InvalidSpec", "; ".join(problems), warning=True)
        return Outcome("invalid", tuple(problems), recheck)

    async def _outcome_events(
        self,
        state: ServiceState,
        *,
        spec: RembgServiceSpec,
        capabilities: Capabilities,
        generation: int,
        errors: list[str],
        new_generation: bool,
    ) -> None:
        if errors:
            await self.events.once(state, "ApplyFailed", "; ".join(errors), warning=True)
            return
        if spec.gpu is not None and capabilities.gpu_capacity == 0:
            await self.events.once(
                state,
                "NoGpuCapacity",
                "no node has allocatable nvidia.com/gpu; the GPU pool's pods stay Pending",
                warning=True,
            )
        if new_generation:
            await self.events.once(
                state, "Applied", f"generation {generation} applied", warning=False
            )


def parse_spec(raw: Mapping[str, Any]) -> tuple[RembgServiceSpec | None, list[str]]:
    """The spec once, typed; problems the schema cannot catch as messages."""
    try:
        spec = RembgServiceSpec.model_validate(raw)
    except ValidationError as error:
        return None, [
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()
        ]
    return spec, semantic_problems(spec)


def merge_patch(previous: Mapping[str, Any] | None, status: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch that also removes keys the new status no longer has, at any depth
    (a gone pool; a pool's notReady once every pod is ready; its autoscaler's message once
    KEDA says Ready)."""
    patch: dict[str, Any] = {k: None for k in (previous or {}) if k not in status}
    for key, value in status.items():
        before = (previous or {}).get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = merge_patch(before, value)
        else:
            patch[key] = value
    return patch


def _record(
    ref: ServiceRef,
    spec: RembgServiceSpec,
    desired: DesiredChildren,
    capabilities: Capabilities,
    *,
    generation: int,
    inventory: list[ChildIdentity],
    errors: list[str],
    skipped: list[Skipped],
) -> Record:
    autoscaled = autoscaler_available(spec, capabilities)
    fallback_active = capabilities.gpu_capacity == 0 and spec.fallback.cpu_pool_when_no_gpu_nodes
    # The ScaledObjects that exist to be read back: not one whose CRD went away meanwhile.
    unserved = {s.name for s in skipped if s.kind == "ScaledObject"}
    keda = autoscaled and spec.autoscaling.engine == "keda"
    return Record(
        generation=generation,
        endpoint=ref.endpoint,
        models=tuple(spec.models),
        pools=tuple(
            PoolTarget(
                pool=plan.name,
                deployment=ref.pool_object_name(plan.name),
                required=not (plan.is_gpu and fallback_active),
                minimum=plan.min_replicas if autoscaled else plan.fixed_replicas,
                scaled_object=_scaled_object_name(ref, plan.name, keda=keda, unserved=unserved),
            )
            for plan in desired.plans
        ),
        apply_errors=tuple(errors),
        skipped=tuple(skipped),
        monitoring_enabled=spec.monitoring.enabled,
        autoscaling_enabled=spec.autoscaling.enabled,
        autoscaling_engine=spec.autoscaling.engine,
        has_gpu_pool=spec.gpu is not None,
        gpu_capacity=capabilities.gpu_capacity,
        gpu_fallback_active=fallback_active and spec.gpu is not None,
        inventory=tuple(inventory),
    )


def _scaled_object_name(
    ref: ServiceRef, pool: str, *, keda: bool, unserved: set[str]
) -> str | None:
    name = ref.pool_object_name(pool)
    return name if keda and name not in unserved else None


def _scaled_object(state: ServiceState, target: PoolTarget) -> ScaledObjectObservation | None:
    if target.scaled_object is None:
        return None
    return ScaledObjectObservation.from_scaled_object(
        target.scaled_object, state.scaled_objects.get(target.scaled_object)
    )


def _observation(record: Record, pools: list[PoolObservation]) -> Observation:
    return Observation(
        generation=record.generation,
        endpoint=record.endpoint,
        models=record.models,
        pools=pools,
        spec_problems=record.spec_problems,
        apply_errors=record.apply_errors,
        skipped=record.skipped,
        monitoring_enabled=record.monitoring_enabled,
        autoscaling_enabled=record.autoscaling_enabled,
        autoscaling_engine=record.autoscaling_engine,
        has_gpu_pool=record.has_gpu_pool,
        gpu_capacity=record.gpu_capacity,
        gpu_fallback_active=record.gpu_fallback_active,
        inventory=[{"apiVersion": a, "kind": k, "name": n} for a, k, n in record.inventory],
    )


def _pools_from_status(status: Mapping[str, Any] | None, ref: ServiceRef) -> tuple[PoolTarget, ...]:
    pools = (status or {}).get("pools") or {}
    return tuple(PoolTarget(pool, ref.pool_object_name(pool)) for pool in sorted(pools))
