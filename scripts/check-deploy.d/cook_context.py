"""The files the image's dependency layer is cooked from.

Usage: cook_context.py DOCKERFILE CONTEXT OUT

Copies into OUT what the Dockerfile's `cargo chef cook` stage copies from the build context
(CONTEXT, less what .dockerignore leaves out) before it cooks, so that scripts/check-deploy can
cook cargo-chef's recipe there as `docker build` would: a path the workspace needs that the
recipe does not carry (a patched crate outside the workspace, ADR 30) and the stage does not
copy fails there as it fails in the image's build. Understands what this Dockerfile uses (FROM,
COPY with flags and a destination relative to the WORKDIR, line continuations); a COPY it cannot
follow (JSON form, wildcards, --parents, an absolute destination) is an error, not a guess.
"""

import fnmatch
import os
import shlex
import shutil
import sys

COOK = "cargo chef cook"


def instructions(path):
    """(keyword, rest) per instruction, continuation lines joined, comments left out."""
    out, pending = [], ""
    for line in open(path, encoding="utf-8"):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continued instruction, as Docker reads it
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def ignored_patterns(context):
    path = os.path.join(context, ".dockerignore")
    if not os.path.exists(path):
        return []
    patterns = []
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith("#"):
            if line.startswith("!"):
                sys.exit(f"{path}: exceptions ({line}) are not understood here")
            patterns.append(line.strip("/"))
    return patterns


def is_ignored(relative, patterns):
    for pattern in patterns:
        bare = pattern[3:] if pattern.startswith("**/") else None
        if fnmatch.fnmatch(relative, pattern) or relative.startswith(pattern + "/"):
            return True
        if bare is not None:
            parts = relative.split("/")
            if any(fnmatch.fnmatch(part, bare) for part in parts):
                return True
    return False


def copy(context, source, target, patterns):
    """Docker's COPY of one source: a directory's contents into target, a file to target."""
    if any(c in source for c in "*?["):
        sys.exit(f"COPY {source}: wildcards are not understood here")
    relative = os.path.normpath(source).lstrip("/")
    origin = os.path.join(context, relative)
    if relative != "." and is_ignored(relative, patterns):
        sys.exit(f"COPY {source}: left out by .dockerignore")
    if os.path.isdir(origin):
        for directory, dirs, files in os.walk(origin):
            inside = os.path.relpath(directory, context)
            dirs[:] = [d for d in dirs if not is_ignored(os.path.normpath(os.path.join(inside, d)), patterns)]
            for name in files:
                file_relative = os.path.normpath(os.path.join(inside, name))
                if is_ignored(file_relative, patterns):
                    continue
                destination = os.path.join(target, os.path.relpath(os.path.join(directory, name), origin))
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                shutil.copy2(os.path.join(directory, name), destination)
    elif os.path.isfile(origin):
        destination = os.path.join(target, os.path.basename(origin)) if target.endswith("/") else target
        os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
        shutil.copy2(origin, destination)
    else:
        sys.exit(f"COPY {source}: not in the build context")


def stages(path):
    """Each stage's instructions after its FROM, in order (also used by policy.py)."""
    out = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            out.append([])
        elif out:
            out[-1].append((keyword, rest))
    return out


def main(dockerfile, context, out):
    cooking = [s for s in stages(dockerfile) if any(k == "RUN" and COOK in r for k, r in s)]
    if len(cooking) != 1:
        sys.exit(f"{dockerfile}: expected one stage that runs `{COOK}`, found {len(cooking)}")
    patterns = ignored_patterns(context)
    os.makedirs(out, exist_ok=True)
    copied = 0
    for keyword, rest in cooking[0]:
        if keyword == "RUN" and COOK in rest:
            break
        if keyword != "COPY":
            continue
        if rest.startswith("["):
            sys.exit(f"COPY {rest}: the JSON form is not understood here")
        words = shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue  # from another stage (the recipe), not the build context
        if any(f.startswith("--parents") for f in flags) or len(paths) < 2:
            sys.exit(f"COPY {rest}: not understood here")
        *sources, destination = paths
        if os.path.isabs(destination):
            sys.exit(f"COPY {rest}: an absolute destination is not understood here")
        # Relative to the stage's WORKDIR, where the recipe is cooked: OUT stands for it.
        target = os.path.join(out, destination)
        for source in sources:
            copy(context, source, target, patterns)
            copied += 1
    print(f"{copied} path(s) copied from the build context before `{COOK}`")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
