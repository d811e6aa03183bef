"""The Pod Security "restricted" level, check by check, as the admission plugin enforces it.

Ported from kubernetes/pod-security-admission v0.34.0 (policy/check_*.go),
level restricted, version latest: every baseline check plus the restricted
ones, with the restricted variants overriding capabilities_baseline,
hostPathVolumes and seccompProfile_baseline. Containers are visited as
``visitContainers`` does: initContainers, containers, ephemeralContainers.
User-namespace relaxation (hostUsers: false) is not modelled: it is off
unless a cluster enables it. Input is a pod spec as a dict (the API's JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Pod = Mapping[str, Any]

_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def containers(pod: Pod) -> Iterator[Mapping[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _context(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return container.get("securityContext") or {}


def host_namespaces(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    bad = [f"{key}=true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    return f"host namespaces ({', '.join(bad)})" if bad else None


def privileged(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    bad = [c["name"] for c in containers(pod) if _context(c).get("privileged")]
    return f"privileged (containers {bad} must not set securityContext.privileged=true)" if bad else None


def host_ports(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    bad = [c["name"] for c in containers(pod) if any(p.get("hostPort") for p in c.get("ports") or [])]
    return f"hostPort (containers {bad} use hostPorts)" if bad else None


def app_armor(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    def ok(profile: Mapping[str, Any] | None) -> bool:
        return profile is None or profile.get("type") in ("RuntimeDefault", "Localhost")

    bad = [c["name"] for c in containers(pod) if not ok(_context(c).get("appArmorProfile"))]
    if not ok((pod.get("securityContext") or {}).get("appArmorProfile")):
        bad.append("pod")
    bad += [
        k
        for k, v in annotations.items()
        if k.startswith("container.apparmor.security.beta.kubernetes.io/")
        and not (v == "runtime/default" or v.startswith("localhost/"))
    ]
    return f"forbidden AppArmor profile ({bad})" if bad else None


def selinux(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    def ok(options: Mapping[str, Any] | None) -> bool:
        return options is None or (
            options.get("type", "") in _SELINUX_TYPES and not options.get("user") and not options.get("role")
        )

    bad = [c["name"] for c in containers(pod) if not ok(_context(c).get("seLinuxOptions"))]
    if not ok((pod.get("securityContext") or {}).get("seLinuxOptions")):
        bad.append("pod")
    return f"seLinuxOptions ({bad})" if bad else None


def proc_mount(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    bad = [c["name"] for c in containers(pod) if _context(c).get("procMount", "Default") != "Default"]
    return f"procMount (containers {bad} must not set securityContext.procMount)" if bad else None


def sysctls(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    bad = [s["name"] for s in (pod.get("securityContext") or {}).get("sysctls") or [] if s["name"] not in _SAFE_SYSCTLS]
    return f"forbidden sysctls ({bad})" if bad else None


def windows_host_process(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    def on(context: Mapping[str, Any]) -> bool:
        return bool((context.get("windowsOptions") or {}).get("hostProcess"))

    bad = [c["name"] for c in containers(pod) if on(_context(c))] + (
        ["pod"] if on(pod.get("securityContext") or {}) else []
    )
    return f"hostProcess ({bad})" if bad else None


def host_probes_and_lifecycle(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    def hosts(handler: Mapping[str, Any] | None) -> list[str]:
        handler = handler or {}
        return [
            h for h in ((handler.get("httpGet") or {}).get("host"), (handler.get("tcpSocket") or {}).get("host")) if h
        ]

    bad = [
        c["name"]
        for c in containers(pod)
        if any(hosts(c.get(p)) for p in ("livenessProbe", "readinessProbe", "startupProbe"))
        or any(hosts((c.get("lifecycle") or {}).get(h)) for h in ("postStart", "preStop"))
    ]
    return f"probe or lifecycle host ({bad})" if bad else None


def restricted_volumes(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    bad = [v["name"] for v in pod.get("volumes") or [] if not (set(v) - {"name"}) & _VOLUMES]
    return f"restricted volume types ({bad})" if bad else None


def allow_privilege_escalation(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    if (pod.get("os") or {}).get("name") == "windows":
        return None
    bad = [c["name"] for c in containers(pod) if _context(c).get("allowPrivilegeEscalation") is not False]
    return (
        (
            f"allowPrivilegeEscalation != false (containers {bad} must set "
            "securityContext.allowPrivilegeEscalation=false)"
        )
        if bad
        else None
    )


def run_as_non_root(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    pod_value = (pod.get("securityContext") or {}).get("runAsNonRoot")
    if pod_value is False:
        return "runAsNonRoot != true (pod must not set securityContext.runAsNonRoot=false)"
    explicit = [c["name"] for c in containers(pod) if _context(c).get("runAsNonRoot") is False]
    implicit = [c["name"] for c in containers(pod) if "runAsNonRoot" not in _context(c) and pod_value is not True]
    if explicit:
        return f"runAsNonRoot != true (containers {explicit} must not set securityContext.runAsNonRoot=false)"
    if implicit:
        return f"runAsNonRoot != true (pod or containers {implicit} must set securityContext.runAsNonRoot=true)"
    return None


def run_as_user(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    bad = (["pod"] if (pod.get("securityContext") or {}).get("runAsUser") == 0 else []) + [
        c["name"] for c in containers(pod) if _context(c).get("runAsUser") == 0
    ]
    return f"runAsUser=0 ({bad} must not set runAsUser=0)" if bad else None


def seccomp_restricted(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    def valid(profile: Mapping[str, Any]) -> bool:
        return profile.get("type") in ("RuntimeDefault", "Localhost")

    pod_profile = (pod.get("securityContext") or {}).get("seccompProfile")
    if pod_profile is not None and not valid(pod_profile):
        return f"seccompProfile (pod must not set securityContext.seccompProfile.type to {pod_profile.get('type')})"
    explicit = [
        c["name"]
        for c in containers(pod)
        if "seccompProfile" in _context(c) and not valid(_context(c)["seccompProfile"])
    ]
    implicit = [c["name"] for c in containers(pod) if "seccompProfile" not in _context(c) and pod_profile is None]
    if explicit:
        return f"seccompProfile (containers {explicit} must not set an unconfined seccompProfile)"
    if implicit and (pod.get("os") or {}).get("name") != "windows":
        return (
            f"seccompProfile (pod or containers {implicit} must set securityContext.seccompProfile.type to "
            '"RuntimeDefault" or "Localhost")'
        )
    return None


def capabilities_restricted(pod: Pod, annotations: Mapping[str, str]) -> str | None:
    if (pod.get("os") or {}).get("name") == "windows":
        return None
    missing = [
        c["name"] for c in containers(pod) if "ALL" not in ((_context(c).get("capabilities") or {}).get("drop") or [])
    ]
    adding = [
        c["name"]
        for c in containers(pod)
        if set((_context(c).get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}
    ]
    details = ([f'containers {missing} must set securityContext.capabilities.drop=["ALL"]'] if missing else []) + (
        [f"containers {adding} must not add capabilities other than NET_BIND_SERVICE"] if adding else []
    )
    return f"unrestricted capabilities ({'; '.join(details)})" if details else None


RESTRICTED: tuple[Callable[[Pod, Mapping[str, str]], str | None], ...] = (
    host_namespaces,
    privileged,
    host_ports,
    app_armor,
    selinux,
    proc_mount,
    sysctls,
    windows_host_process,
    host_probes_and_lifecycle,
    restricted_volumes,
    allow_privilege_escalation,
    run_as_non_root,
    run_as_user,
    seccomp_restricted,
    capabilities_restricted,
)


def violations(pod: Pod, annotations: Mapping[str, str] | None = None) -> list[str]:
    """What ``pod-security.kubernetes.io/enforce: restricted`` would reject this pod for (empty: admitted)."""
    return [reason for check in RESTRICTED if (reason := check(pod, annotations or {}))]
