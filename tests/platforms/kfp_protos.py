"""The protobuf messages each supported KFP backend parses a compiled pipeline with.

Source: kubeflow/pipelines at the backend tags. The API server reads the
pipeline document with ``protojson.Unmarshal`` into ``PipelineSpec`` and the
platform document into ``PlatformSpec`` (backend/src/apiserver/template/
v2_template.go): unknown fields are errors. The driver reads each executor's
Kubernetes config into ``KubernetesExecutorConfig``; 2.2.0/2.3.0 did that with
a strict ``jsonpb.UnmarshalString`` (backend/src/v2/cmd/driver/main.go), so the
fields kfp-kubernetes 2.17 writes (``optional``, ``secretNameParameter``) broke
them, and 2.4.1+ drops unknown fields silently, so a field it does not know is
a setting that quietly does nothing. Either way a compiled pipeline must parse
strictly against the protos of every supported backend.

Which protos each backend was built with (go.mod at the tag, compared field by
field with the generated code in the PyPI packages):

| backend | pipeline_spec proto            | kubernetes_executor_config proto |
|---------|--------------------------------|----------------------------------|
| 2.4.1   | api@873e9dedd766 = kfp-pipeline-spec 0.6.0 | kubernetes_platform@d911c8b73b49 = kfp-kubernetes 1.3.0 |
| 2.5.0   | ./api@2.5.0 = 0.6.0 + 3 PipelineConfig fields (0.6.0 is used: stricter) | kfp-kubernetes 1.5.0 |
| 2.15.0  | kfp-pipeline-spec 2.15.0       | kfp-kubernetes 2.15.0            |

The generated ``*_pb2.py`` files register into protobuf's global pool, and
two versions of the same file cannot live there together; so the serialized
file descriptors are read out of the archives and loaded into a private pool
per backend.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    json_format,
    message_factory,
    struct_pb2,
)
from google.rpc import status_pb2

from tests.platforms.archives import archive, read_member

#: backend version -> (kfp-pipeline-spec version, kfp-kubernetes version)
BACKENDS: dict[str, tuple[str, str]] = {
    "2.4.1": ("0.6.0", "1.3.0"),
    "2.5.0": ("0.6.0", "1.5.0"),
    "2.15.0": ("2.15.0", "2.15.0"),
}


@dataclass(frozen=True)
class BackendProtos:
    version: str
    pool: descriptor_pool.DescriptorPool

    def parse(self, message: str, document: Any) -> Any:
        """``document`` parsed strictly into ``message`` (a full name); raises ParseError on unknown fields."""
        cls = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(message))
        return json_format.ParseDict(document, cls(), ignore_unknown_fields=False)

    def check_pipeline(self, pipeline_doc: dict[str, Any], platform_doc: dict[str, Any] | None) -> None:
        """What the API server and the driver of this backend parse, all strictly."""
        self.parse("ml_pipelines.PipelineSpec", pipeline_doc)
        if platform_doc is None:
            return
        self.parse("ml_pipelines.PlatformSpec", platform_doc)
        executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for name, config in executors.items():
            try:
                self.parse("kfp_kubernetes.KubernetesExecutorConfig", config)
            except json_format.ParseError as err:
                raise json_format.ParseError(f"{name}: {err}") from None


def _file_descriptor(pb2_source: str) -> descriptor_pb2.FileDescriptorProto:
    match = re.search(r"AddSerializedFile\((b'.*?')\)", pb2_source, re.S)
    assert match, "not a generated *_pb2.py"
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(ast.literal_eval(match.group(1)))
    return proto


@functools.cache
def backend(version: str) -> BackendProtos:
    spec_version, kubernetes_version = BACKENDS[version]
    pool = descriptor_pool.DescriptorPool()
    for module in (any_pb2, struct_pb2, duration_pb2, status_pb2):  # what pipeline_spec.proto imports
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    pool.Add(_file_descriptor(read_member(archive("kfp-pipeline-spec", spec_version), "pipeline_spec_pb2.py")))
    pool.Add(
        _file_descriptor(
            read_member(archive("kfp-kubernetes", kubernetes_version), "kubernetes_executor_config_pb2.py")
        )
    )
    return BackendProtos(version, pool)
