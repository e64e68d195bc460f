"""What a KFP backend's API server checks when a compiled pipeline is uploaded and run,
against the protobuf schemas of that backend's release (kfp-pipeline-spec and kfp-kubernetes
of the same version, installed by ``pipeline_check.py`` into a folder of their own).

    python tools/kfp_upload_check.py --schemas DIR [--params FILE.json] PIPELINE.yaml

Runs in a process of its own: the schemas are loaded by path under the names ``kfp.*`` and
must not meet the kfp SDK of the environment. It follows the backend's Go code (read in
kubeflow/pipelines at the pinned tags, backend/src/apiserver/template and
backend/src/v2/compiler/argocompiler):

1. Each YAML document is parsed strictly (protojson without DiscardUnknown, as
   ``template.New`` does): the one that parses as a PipelineSpec with a name and a root is the
   pipeline; one that parses as a PlatformSpec with a ``kubernetes`` entry is the platform
   spec. A platform document that does *not* parse is not an error there: the backend ignores
   it without a word, and the run loses every Kubernetes setting. Here it is an error.
2. schemaVersion 2.1.0, a pipeline name, a root component.
3. The run parameters against the root's inputs (``validatePipelineJobInputs``): required
   ones present, each of its declared type, no unknown one.
4. Each executor's Kubernetes config parses strictly as that release's
   KubernetesExecutorConfig (argocompiler refuses the run otherwise).

Prints a JSON summary; on a refusal prints ``error: ...`` and exits 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import types

import yaml


def load_schemas(directory: str):
    """pipeline_spec_pb2 and kubernetes_executor_config_pb2 of the release in ``directory``."""
    for name, sub in (("kfp", "kfp"), ("kfp.pipeline_spec", "kfp/pipeline_spec"),
                      ("kfp.kubernetes", "kfp/kubernetes")):
        module = types.ModuleType(name)
        # Not run: kfp/kubernetes/__init__.py imports the kfp SDK.
        module.__path__ = [os.path.join(directory, sub)]
        sys.modules[name] = module
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    return pipeline_spec_pb2, kubernetes_executor_config_pb2


class Refused(Exception):
    pass


def _parse(message_type, value: dict):
    from google.protobuf import json_format

    return json_format.ParseDict(value, message_type(), ignore_unknown_fields=False)


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "struct", type(None): "null"}[type(value)]


PARAMETER_KINDS = {"NUMBER_DOUBLE": "number", "NUMBER_INTEGER": "number", "STRING": "string",
                   "BOOLEAN": "bool", "LIST": "list", "STRUCT": "struct"}


def check(pipeline_yaml: str, schemas: str, params: dict) -> dict:
    from google.protobuf import json_format

    spec_pb2, k8s_pb2 = load_schemas(schemas)
    spec = platform = None
    with open(pipeline_yaml) as f:
        documents = [d for d in yaml.safe_load_all(f) if d is not None]
    for index, document in enumerate(documents):
        try:
            candidate = _parse(spec_pb2.PipelineSpec, document)
        except json_format.ParseError as exc:
            candidate, spec_error = None, exc
        if candidate is not None and candidate.pipeline_info.name and candidate.HasField("root"):
            if spec is not None:
                raise Refused("multiple pipeline specs provided")
            spec = candidate
            continue
        if "pipelineInfo" in document or "root" in document:
            raise Refused(f"document {index + 1} is not a PipelineSpec it knows: {spec_error}")
        try:
            candidate = _parse(spec_pb2.PlatformSpec, document)
        except json_format.ParseError as exc:
            raise Refused(f"document {index + 1} (the platform spec) does not parse with this "
                          f"release's schema, so the backend would silently ignore it and every "
                          f"Kubernetes setting in it: {exc}") from None
        if "kubernetes" in candidate.platforms:
            if platform is not None:
                raise Refused("multiple platform specs provided")
            platform = candidate
    if spec is None:
        raise Refused("no pipeline spec is provided")
    if spec.schema_version != "2.1.0":
        raise Refused(f"KFP only supports schema version 2.1.0, but the pipeline spec has "
                      f"version {spec.schema_version}")
    if not re.match(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                    spec.pipeline_info.name):
        raise Refused(f"invalid pipeline name {spec.pipeline_info.name!r}")

    definitions = spec.root.input_definitions.parameters
    for name, definition in sorted(definitions.items()):  # (Go: map order)
        kind = spec_pb2.ParameterType.ParameterTypeEnum.Name(definition.parameter_type)
        if name not in params:
            if not definition.is_optional and not definition.HasField("default_value"):
                raise Refused(f"parameter {name} is not optional, yet has neither default "
                              "value nor user provided value")
            continue
        want = PARAMETER_KINDS.get(kind)
        if want is None:
            raise Refused(f"input parameter {name} has type {kind}, invalid for a root input")
        if _kind(params[name]) != want:
            raise Refused(f"input parameter {name} requires type {want}, but the value "
                          f"{params[name]!r} is a {_kind(params[name])}")
    extra = sorted(set(params) - set(definitions))
    if extra:
        raise Refused(f"unrecognized input parameter(s): {', '.join(extra)}")

    executors = {}
    config = {}
    if platform is not None:
        kubernetes = platform.platforms["kubernetes"]
        known = json_format.MessageToDict(spec.deployment_spec).get("executors", {})
        for name, value in kubernetes.deployment_spec.executors.items():
            if name not in known:
                raise Refused(f"the platform spec configures {name}, which is no executor")
            try:
                parsed = _parse(k8s_pb2.KubernetesExecutorConfig,
                                json_format.MessageToDict(value))
            except json_format.ParseError as exc:
                raise Refused(f"failed to unmarshal kubernetes config of {name}: {exc}") from None
            executors[name] = json_format.MessageToDict(parsed)
        # The field is named pipelineConfig in the .proto itself.
        config = json_format.MessageToDict(kubernetes).get("pipelineConfig", {})
    return {
        "pipeline": spec.pipeline_info.name,
        "display_name": spec.pipeline_info.display_name,
        "parameters": sorted(definitions),
        "platform_spec": platform is not None,
        "pipeline_config": config,
        "kubernetes_executors": executors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--schemas", required=True, metavar="DIR")
    parser.add_argument("--params", metavar="FILE", help="run parameters, a JSON object")
    parser.add_argument("pipeline", metavar="PIPELINE.yaml")
    args = parser.parse_args(argv)
    params = {}
    if args.params:
        with open(args.params) as f:
            params = json.load(f)
        if not isinstance(params, dict):
            print(f"error: --params {args.params} is not a JSON object", file=sys.stderr)
            return 2
    try:
        result = check(args.pipeline, args.schemas, params)
    except Refused as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 1
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
