"""Kubernetes RBAC, evaluated rule by rule, with the roles a Kubeflow profile gets.

The authorizer follows k8s.io/kubernetes plugin/pkg/auth/authorizer/rbac
(``RuleAllows``): a request is allowed when some rule of a role bound to the
user, in the request's namespace (RoleBinding) or cluster-wide
(ClusterRoleBinding), matches its API group, resource (``resource/subresource``),
verb and name, ``*`` matching anything. No rule, no access.

Kubeflow's side, transcribed from kubeflow/manifests (the same at v1.10.0,
v1.10.2 and v1.11.0 unless noted):

- the profile controller (kubeflow/dashboard components/profile-controller/
  controllers/profile_controller.go) creates in every profile namespace the
  ServiceAccount ``default-editor`` bound by RoleBinding to ClusterRole
  ``kubeflow-edit``; KFP multi-user runs pipeline pods as that account
  (applications/pipeline/.../multi-user/api-service/params.env:
  ``DEFAULTPIPELINERUNNERSERVICEACCOUNT=default-editor``);
- ``kubeflow-edit`` aggregates every ClusterRole labelled
  ``rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit`` (common/
  kubeflow-roles/base/cluster-roles.yaml), among them ``kubeflow-view``,
  ``kubeflow-kubernetes-edit``, ``kubeflow-pipelines-edit`` and
  ``kubeflow-kserve-edit`` (applications/kserve/kserve/kserve_kubeflow.yaml);
  only the rules for the API groups chest-ct touches are transcribed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Rule = Mapping[str, Any]

_EDIT = ["get", "list", "watch", "create", "delete", "deletecollection", "patch", "update"]
KUBEFLOW_EDIT_RULES: dict[str, list[Rule]] = {
    # kubeflow-kserve-edit, from kserve_kubeflow.yaml (1.10.0: KServe 0.14.1; 1.10.2/1.11.0: 0.15.x)
    "v1.10.0": [
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices", "servingruntimes"], "verbs": _EDIT}
    ],
    "v1.11.0": [
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferencegraphs", "inferenceservices", "servingruntimes", "trainedmodels"],
            "verbs": _EDIT,
        }
    ],
}
_COMMON_EDIT: list[Rule] = [
    {
        "apiGroups": ["serving.knative.dev"],
        "resources": [
            "services",
            "services/status",
            "routes",
            "routes/status",
            "configurations",
            "configurations/status",
            "revisions",
            "revisions/status",
        ],
        "verbs": _EDIT,
    },
    # kubeflow-kubernetes-edit / -view (excerpt: what pipeline pods use)
    {
        "apiGroups": [""],
        "resources": ["pods", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy"],
        "verbs": ["create", "delete", "deletecollection", "patch", "update"],
    },
    {
        "apiGroups": [""],
        "resources": ["configmaps", "endpoints", "persistentvolumeclaims", "secrets", "serviceaccounts", "services"],
        "verbs": ["create", "delete", "deletecollection", "patch", "update"],
    },
    {
        "apiGroups": [""],
        "resources": ["pods/attach", "pods/exec", "pods/portforward", "pods/proxy", "secrets", "services/proxy"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": [""],
        "resources": [
            "configmaps",
            "endpoints",
            "persistentvolumeclaims",
            "pods",
            "serviceaccounts",
            "services",
            "events",
            "pods/log",
            "pods/status",
        ],
        "verbs": ["get", "list", "watch"],
    },
    # aggregate-to-kubeflow-pipelines-edit (excerpt)
    {"apiGroups": ["argoproj.io"], "resources": ["workflows", "workflowtaskresults"], "verbs": ["*"]},
]


def kubeflow_edit(manifests_tag: str) -> list[Rule]:
    return [*KUBEFLOW_EDIT_RULES[manifests_tag], *_COMMON_EDIT]


@dataclass(frozen=True)
class Request:
    user: str  # e.g. system:serviceaccount:<namespace>:<name>
    verb: str
    namespace: str
    group: str
    resource: str
    name: str = ""
    subresource: str = ""


@dataclass
class Authorizer:
    """Roles and bindings as the API server holds them (ClusterRoles already aggregated)."""

    roles: dict[tuple[str, str], list[Rule]] = field(default_factory=dict)  # (namespace, name)
    cluster_roles: dict[str, list[Rule]] = field(default_factory=dict)
    role_bindings: list[dict[str, Any]] = field(default_factory=list)
    cluster_role_bindings: list[dict[str, Any]] = field(default_factory=list)

    def load(self, docs: Iterable[Mapping[str, Any]]) -> Authorizer:
        """Add the RBAC objects among ``docs`` (a kustomize build)."""
        for doc in docs:
            kind, meta = doc.get("kind"), doc.get("metadata") or {}
            if kind == "Role":
                self.roles[(meta["namespace"], meta["name"])] = list(doc.get("rules") or [])
            elif kind == "ClusterRole":
                self.cluster_roles[meta["name"]] = list(doc.get("rules") or [])
            elif kind == "RoleBinding":
                self.role_bindings.append(dict(doc))
            elif kind == "ClusterRoleBinding":
                self.cluster_role_bindings.append(dict(doc))
        return self

    def add_profile(self, namespace: str, manifests_tag: str = "v1.11.0") -> Authorizer:
        """What the Kubeflow profile controller creates for profile ``namespace``."""
        self.cluster_roles["kubeflow-edit"] = kubeflow_edit(manifests_tag)
        self.role_bindings.append(
            {
                "metadata": {"name": "default-editor", "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
                "subjects": [{"kind": "ServiceAccount", "name": "default-editor", "namespace": namespace}],
            }
        )
        return self

    def allowed(self, request: Request) -> bool:
        return any(_rule_allows(rule, request) for rule in self.rules_for(request.user, request.namespace))

    def rules_for(self, user: str, namespace: str) -> list[Rule]:
        rules: list[Rule] = []
        for binding in self.cluster_role_bindings:
            if _bound(binding, user):
                rules += self.cluster_roles.get(binding["roleRef"]["name"], [])
        for binding in self.role_bindings:
            if binding["metadata"].get("namespace") != namespace or not _bound(binding, user):
                continue
            ref = binding["roleRef"]
            rules += (
                self.cluster_roles.get(ref["name"], [])
                if ref["kind"] == "ClusterRole"
                else self.roles.get((namespace, ref["name"]), [])
            )
        return rules

    def denial(self, request: Request) -> str:
        """The API server's message for a denied request."""
        resource = request.resource + (f"/{request.subresource}" if request.subresource else "")
        qualified = f"{resource}.{request.group}" if request.group else resource
        what = f'{qualified} "{request.name}"' if request.name else qualified
        return (
            f'{what} is forbidden: User "{request.user}" cannot {request.verb} resource "{resource}" in API '
            f'group "{request.group}" in the namespace "{request.namespace}"'
        )


def _bound(binding: Mapping[str, Any], user: str) -> bool:
    for subject in binding.get("subjects") or []:
        if subject.get("kind") == "ServiceAccount":
            namespace = subject.get("namespace") or binding["metadata"].get("namespace")
            if user == f"system:serviceaccount:{namespace}:{subject['name']}":
                return True
        elif subject.get("kind") == "User" and subject.get("name") == user:
            return True
    return False


def _rule_allows(rule: Rule, request: Request) -> bool:
    resource = request.resource + (f"/{request.subresource}" if request.subresource else "")
    return (
        _matches(rule.get("apiGroups"), request.group)
        and _matches(rule.get("resources"), resource)
        and _matches(rule.get("verbs"), request.verb)
        and (not rule.get("resourceNames") or request.name in rule["resourceNames"])
    )


def _matches(values: Iterable[str] | None, wanted: str) -> bool:
    values = list(values or [])
    return "*" in values or wanted in values
