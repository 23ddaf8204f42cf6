"""Which QuPath members the ZEUS extension uses, and whether each is declared the same in QuPath 0.4.4 .. 0.7.0.

The members come from the compiled jar (``javap -c -p``: every method a class calls, with its exact descriptor, and
every QuPath interface a class implements), so nothing the source uses is missed. Each is looked up in the sources
of every release tag: ``qupath-core`` from ``<qupath root>/<v>/qupath-core-<v>-sources.tar.gz``; the other modules
(qupath-gui-fx, qupath-core-processing) from ``tests/data/qupath-api/declarations.json``, the class headers and
member declarations (signatures only) of the classes the extension touches, extracted from the tags of
github.com/qupath/qupath by ``python tests/qupath/api_scan.py QUPATH_GIT_DIR JAR`` (blob IDs recorded). A member
matches when the class (or a QuPath supertype) declares it public with the same name, parameter types, return type
(erased, simple names) and static-ness; an implemented interface must have no abstract method the extension lacks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

TAGS = ("0.4.4", "0.5.1", "0.6.0", "0.7.0")
STORED = Path(__file__).resolve().parents[1] / "data" / "qupath-api" / "declarations.json"
CORE_PREFIX = "qupath-core/src/main/java/"
PRIMITIVES = {"Z": "boolean", "B": "byte", "C": "char", "S": "short", "I": "int", "J": "long", "F": "float",
              "D": "double", "V": "void"}
MODIFIERS = {"public", "protected", "private", "static", "final", "abstract", "default", "synchronized", "native",
             "strictfp", "transient", "volatile"}


@dataclass(frozen=True)
class Ref:
    """A QuPath member the jar uses: a method call, or an interface one of its classes implements."""

    owner: str  # binary name, e.g. qupath.lib.scripting.ScriptParameters$Builder
    name: str  # method name; "" for an implemented interface
    params: tuple[str, ...] = ()
    ret: str = ""
    static: bool = False
    implementer: str = ""  # for an interface: the jar's class that implements it

    def __str__(self) -> str:
        if not self.name:
            return f"{self.implementer} implements {self.owner}"
        return f"{'static ' if self.static else ''}{self.ret} {self.owner}.{self.name}({', '.join(self.params)})"


def _type(desc: str, i: int) -> tuple[str, int]:
    dims = 0
    while desc[i] == "[":
        dims, i = dims + 1, i + 1
    if desc[i] == "L":
        end = desc.index(";", i)
        simple, i = desc[i + 1:end].rsplit("/", 1)[-1].rsplit("$", 1)[-1], end + 1
    else:
        simple, i = PRIMITIVES[desc[i]], i + 1
    return simple + "[]" * dims, i


def parse_descriptor(desc: str) -> tuple[tuple[str, ...], str]:
    """``(Ljava/lang/String;Z)Ljavafx/scene/control/Menu;`` -> (("String", "boolean"), "Menu")."""
    params, i = [], 1
    while desc[i] != ")":
        t, i = _type(desc, i)
        params.append(t)
    return tuple(params), _type(desc, i + 1)[0]


_INVOKE = re.compile(r"invoke(static|virtual|interface|special)\s+#\d+(?:,\s*\d+)?\s+// (?:Interface)?Method "
                     r"(qupath/[\w/$]+)\.([\w$<>\"]+):(\([^ ]*)$")
_HEADER = re.compile(r"^(?:public |final |abstract )*class ([\w.$]+)(?: extends [\w.$<>, ]+?)?"
                     r"(?: implements (.+?))? ?\{$")


def references(jar: Path, javap: Path) -> list[Ref]:
    """Every QuPath method the jar's classes call and every QuPath interface they implement."""
    with zipfile.ZipFile(jar) as z:
        classes = [n[:-6].replace("/", ".") for n in z.namelist() if n.endswith(".class")]
    out = subprocess.run([str(javap), "-c", "-p", "-classpath", str(jar), *classes], capture_output=True,
                         text=True, check=True).stdout
    refs: set[Ref] = set()
    for line in out.splitlines():
        line = line.strip()
        m = _INVOKE.search(line)
        if m:
            kind, owner, name, desc = m.groups()
            params, ret = parse_descriptor(desc)
            refs.add(Ref(owner.replace("/", "."), name.strip('"'), params, ret, kind == "static"))
            continue
        h = _HEADER.match(line)
        if h and h.group(2):
            for iface in h.group(2).split(","):
                iface = re.sub(r"<.*>", "", iface).strip()
                if iface.startswith("qupath."):
                    refs.add(Ref(iface, "", implementer=h.group(1)))
    return sorted(refs, key=str)


def declared_methods(jar: Path, javap: Path, class_name: str) -> set[tuple[str, tuple[str, ...]]]:
    """(name, parameter types) of the methods a jar class declares."""
    out = subprocess.run([str(javap), "-p", "-s", "-classpath", str(jar), class_name], capture_output=True, text=True,
                         check=True).stdout
    found, name = set(), None
    for line in out.splitlines():
        m = re.search(r" ([\w$]+)\(.*\);$", line)
        if m:
            name = m.group(1)
        d = re.search(r"descriptor: (\(.*)$", line)
        if d and name:
            found.add((name, parse_descriptor(d.group(1))[0]))
            name = None
    return found


# ---------------------------------------------------------------------------------------------- Java source


def strip_java(text: str) -> str:
    """Source without comments, string and char literals (kept as empty quotes)."""
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'',
                  lambda m: '""' if m.group(0).startswith('"') else ("''" if m.group(0).startswith("'") else " "),
                  text, flags=re.S)


def _block(text: str, start: int) -> int:
    """Index just after the brace block opening at text[start] == '{'."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced braces")


@dataclass
class JavaClass:
    """A class's header (up to its body), package, imports and the headers of its methods (signatures only; those
    without a body end with ';')."""

    name: str  # binary name
    header: str
    package: str
    imports: list[str]
    members: list[str]

    @classmethod
    def from_source(cls, source: str, binary_name: str) -> JavaClass:
        text = strip_java(source)
        package = (re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.M) or [None, ""])[1]
        imports = re.findall(r"^\s*import\s+([\w.]+)\s*;", text, re.M)
        body, header = text, ""
        for simple in binary_name.rsplit(".", 1)[-1].split("$"):
            m = re.search(r"\b(?:class|interface|enum|record)\s+" + simple + r"\b", body)
            if not m:
                raise KeyError(f"{simple} not declared in the source of {binary_name}")
            open_brace = body.index("{", m.end())
            start = body.rfind(";", 0, m.start())
            start = max(start, body.rfind("}", 0, m.start()), body.rfind("{", 0, m.start())) + 1
            header = " ".join(body[start:open_brace].split())
            body = body[open_brace + 1:_block(body, open_brace) - 1]
        members, depth, seg_start = [], 0, 0
        i = 0
        while i < len(body):
            c = body[i]
            if c == "{" and depth == 0:
                members.append(body[seg_start:i])
                i = _block(body, i)
                seg_start = i
                continue
            if c == ";" and depth == 0:
                members.append(body[seg_start:i] + ";")  # no body: abstract in an interface
                seg_start = i + 1
            elif c in "(":
                depth += 1
            elif c in ")":
                depth -= 1
            i += 1
        members = [" ".join(re.sub(r"@[\w.]+(\([^)]*\))?", " ", s).split()) for s in members]
        methods = [s for s in members if "(" in s and "=" not in s.split("(")[0]]
        return cls(binary_name, header, package, imports, methods)

    def to_json(self) -> dict:
        return {"header": self.header, "package": self.package, "imports": self.imports, "members": self.members}

    @classmethod
    def from_json(cls, name: str, data: dict) -> JavaClass:
        return cls(name, data["header"], data["package"], data["imports"], data["members"])

    @cached_property
    def type_params(self) -> dict[str, str]:
        m = re.search(r"\b(?:class|interface|enum|record)\s+\w+\s*(<.*)$", self.header)
        return _type_params(_leading_angle(m.group(1))[0]) if m else {}

    def supertypes(self) -> list[str]:
        """Binary names of the QuPath classes/interfaces this one extends or implements (resolvable ones)."""
        head = re.sub(r"^.*?\b(?:class|interface|enum|record)\s+\w+\s*", "", self.header)
        if head.startswith("<"):
            head = head[len(_leading_angle(head)[0]):]
        names = []
        for part in re.findall(r"\b(?:extends|implements)\s+(.+?)(?=\bimplements\b|$)", head):
            names += [n.strip() for n in _split_top(_erase(part))]
        out = []
        for n in names:
            simple = n.split(".")[-1]
            full = next((i for i in self.imports if i.endswith("." + simple)), None)
            if full is None and "." in n:
                full = n
            if full is None:
                full = f"{self.package}.{simple}"
            if full.startswith("qupath."):
                out.append(full)
        return out

    def methods(self) -> list[dict]:
        """name, params, ret, static, public, abstract of every method declared (constructors left out)."""
        interface = re.search(r"\binterface\b", self.header) is not None
        found = []
        for seg in self.members:
            before, _, rest = seg.partition("(")
            params_text = rest.rsplit(")", 1)[0]
            words = before.split()
            mods = set()
            while words and words[0] in MODIFIERS:
                mods.add(words.pop(0))
            head = " ".join(words)
            tparams: dict[str, str] = {}
            if head.startswith("<"):
                tp, head = _leading_angle(head)
                tparams = _type_params(tp)
                head = head.strip()
            parts = head.rsplit(" ", 1)
            if len(parts) != 2 or parts[0] in ("new", "return", "throw", "else"):
                continue  # a constructor, or not a declaration
            ret, name = parts
            mapping = {**self.type_params, **tparams}
            params = tuple(_simple(_param_type(p), mapping) for p in _split_top(params_text) if p.strip())
            found.append({"name": name, "params": params, "ret": _simple(ret, mapping), "static": "static" in mods,
                          "public": "public" in mods or (interface and "private" not in mods),
                          "abstract": ("abstract" in mods) or (interface and not mods & {"default", "static", "private"}
                                                               and seg.endswith(";"))})
        return found


def _leading_angle(text: str) -> tuple[str, str]:
    depth = 0
    for i, c in enumerate(text):
        depth += c == "<"
        depth -= c == ">"
        if depth == 0:
            return text[:i + 1], text[i + 1:]
    return text, ""


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for c in text:
        depth += c in "<("
        depth -= c in ">)"
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    return parts + ([cur] if cur.strip() else [])


def _erase(t: str) -> str:
    while "<" in t:
        t = re.sub(r"<[^<>]*>", "", t)
    return t


def _type_params(tp: str) -> dict[str, str]:
    out = {}
    for p in _split_top(tp[1:-1]):
        words = _erase(p).split()
        if words:
            out[words[0]] = words[2].split("&")[0].split(".")[-1] if len(words) > 2 and words[1] == "extends" \
                else "Object"
    return out


def _param_type(p: str) -> str:
    words = [w for w in _erase(p).replace("...", "[] ").split() if w != "final"]
    return " ".join(words[:-1]).replace(" []", "[]").replace(" ", "")


def _simple(t: str, mapping: dict[str, str]) -> str:
    t = _erase(t).replace(" ", "")
    dims = t.count("[]")
    base = t.replace("[]", "").split(".")[-1]
    return mapping.get(base, base) + "[]" * dims


# ---------------------------------------------------------------------------------------------- the scan


class TagSources:
    """The classes of one QuPath tag: qupath-core from its sources tarball, the rest from the stored declarations."""

    def __init__(self, version: str, qupath_root: Path, stored: dict | None = None) -> None:
        self.version = version
        tarball = qupath_root / version / f"qupath-core-{version}-sources.tar.gz"
        with tarfile.open(tarball) as tar:
            self.core = {m.name[len(CORE_PREFIX):]: m for m in tar.getmembers()
                         if m.name.startswith(CORE_PREFIX) and m.name.endswith(".java")}
        self.tarball = tarball
        self.stored = (stored if stored is not None else json.loads(STORED.read_text(encoding="utf-8")))[version]
        self._cache: dict[str, JavaClass | None] = {}

    def get(self, binary_name: str) -> JavaClass | None:
        if binary_name not in self._cache:
            path = binary_name.split("$")[0].replace(".", "/") + ".java"
            if path in self.core:
                with tarfile.open(self.tarball) as tar:
                    source = tar.extractfile(self.core[path]).read().decode("utf-8")
                self._cache[binary_name] = JavaClass.from_source(source, binary_name)
            elif binary_name in self.stored["classes"]:
                self._cache[binary_name] = JavaClass.from_json(binary_name, self.stored["classes"][binary_name])
            else:
                self._cache[binary_name] = None
        return self._cache[binary_name]

    def lineage(self, binary_name: str) -> list[JavaClass]:
        seen, todo, out = set(), [binary_name], []
        while todo:
            name = todo.pop(0)
            if name in seen:
                continue
            seen.add(name)
            cls = self.get(name)
            if cls is not None:
                out.append(cls)
                todo += cls.supertypes()
        return out

    def check(self, ref: Ref, implemented: set[tuple[str, tuple[str, ...]]] = frozenset()) -> str | None:
        """None when ``ref`` is declared the same in this tag; else what differs."""
        lineage = self.lineage(ref.owner)
        if not lineage or lineage[0].name != ref.owner:
            return f"{ref.owner} not found in the {self.version} sources"
        if not ref.name:
            missing = [f"{m['name']}({', '.join(m['params'])})" for cls in lineage for m in cls.methods()
                       if m["abstract"] and (m["name"], m["params"]) not in implemented]
            return f"{ref}: abstract {', '.join(missing)} not implemented" if missing else None
        candidates = [m for cls in lineage for m in cls.methods() if m["name"] == ref.name]
        for m in candidates:
            if m["params"] == ref.params and m["ret"] == ref.ret and m["static"] == ref.static and m["public"]:
                return None
        seen = "; ".join(f"{'static ' if m['static'] else ''}{m['ret']} {ref.name}({', '.join(m['params'])})"
                         for m in candidates) or "no method of that name"
        return f"{ref}: not declared so in {self.version} (found: {seen})"


# ---------------------------------------------------------------------------------------------- generator


def generate(git_dir: Path, jar: Path, javap: Path, qupath_root: Path) -> dict:
    """The stored declarations: every class the jar touches (and its QuPath supertypes) outside qupath-core."""
    out: dict = {}
    refs = references(jar, javap)
    for version in TAGS:
        tag = f"v{version}"
        commit = subprocess.run(["git", "-C", str(git_dir), "rev-parse", tag + "^{commit}"], capture_output=True,
                                text=True, check=True).stdout.strip()
        files = subprocess.run(["git", "-C", str(git_dir), "ls-tree", "-r", "--name-only", tag], capture_output=True,
                               text=True, check=True).stdout.split()
        sources = TagSources(version, qupath_root, {version: {"classes": {}}})
        classes: dict[str, dict] = {}
        todo = sorted({r.owner for r in refs})
        while todo:
            name = todo.pop(0)
            if name in classes or sources.get(name) is not None:
                cls = sources.get(name)
                if cls is not None and name not in classes:
                    todo += [s for s in cls.supertypes() if s not in classes]
                continue
            path = name.split("$")[0].replace(".", "/") + ".java"
            hits = [f for f in files if f.endswith("/src/main/java/" + path)]
            if not hits:
                continue
            text = subprocess.run(["git", "-C", str(git_dir), "show", f"{tag}:{hits[0]}"], capture_output=True,
                                  text=True, check=True).stdout
            blob = subprocess.run(["git", "-C", str(git_dir), "rev-parse", f"{tag}:{hits[0]}"], capture_output=True,
                                  text=True, check=True).stdout.strip()
            cls = JavaClass.from_source(text, name)
            classes[name] = {"path": hits[0], "blob": blob, **cls.to_json()}
            todo += [s for s in cls.supertypes() if s not in classes]
        out[version] = {"tag": tag, "commit": commit, "classes": dict(sorted(classes.items()))}
    return out


if __name__ == "__main__":  # python tests/qupath/api_scan.py QUPATH_GIT_DIR JAR [QUPATH_ROOT]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qupath.harness import find_java, qupath_root

    root = Path(sys.argv[3]) if len(sys.argv) > 3 else qupath_root()
    data = generate(Path(sys.argv[1]), Path(sys.argv[2]), find_java(17) / "bin" / "javap", root)
    STORED.parent.mkdir(parents=True, exist_ok=True)
    STORED.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {STORED}: " + ", ".join(f"{v}: {len(d['classes'])} classes" for v, d in data.items()))
