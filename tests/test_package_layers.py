"""The package layers written in bevdepth/__init__.py: no module of bevdepth/ imports a package that is not
below its own, neither at the top of the file nor inside a function."""
import ast
import pathlib

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1] / 'bevdepth'

# Each package and the packages it sits on directly; what those sit on is allowed too.
SITS_ON = {
    'utils': (),
    'configs': (),
    'ops': ('utils', 'configs'),
    'layers': ('ops',),
    'models': ('layers',),
    'datasets': ('utils', 'configs'),
    'evaluators': ('datasets',),
    'callbacks': ('utils', 'configs'),
    'deploy': ('models', 'evaluators'),
    'engine': ('models', 'evaluators', 'callbacks'),
}


def allowed_imports(package):
    """Every package below ``package`` (the transitive closure of SITS_ON)."""
    below, todo = set(), list(SITS_ON[package])
    while todo:
        name = todo.pop()
        if name not in below:
            below.add(name)
            todo.extend(SITS_ON[name])
    return below


def module_name(path, root):
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def imported_modules(tree, name, is_package):
    """(line, dotted name) of every import in the module, relative imports resolved, function bodies included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = name.split('.')
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = '.'.join(anchor + ([base] if base else []))
            # 'from bevdepth import datasets' imports the package named by the alias.
            for alias in node.names:
                yield node.lineno, f'{base}.{alias.name}' if base == 'bevdepth' else base


def layer_violations(path, root=PACKAGE_ROOT):
    name = module_name(path, root)
    parts = name.split('.')
    own = parts[1] if len(parts) > 1 else None  # None: bevdepth/__init__.py, which sits on nothing
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for line, target in imported_modules(tree, name, path.name == '__init__.py'):
        target_parts = target.split('.')
        if target_parts[0] != 'bevdepth' or len(target_parts) < 2 or target_parts[1] == own:
            continue
        if own is None or target_parts[1] not in allowed_imports(own):
            found.append(f'{name} (line {line}) imports {target}: '
                         f'{target_parts[1]} is not below {own or "the bevdepth root"}')
    return found


def test_every_package_has_a_layer():
    packages = {path.name for path in PACKAGE_ROOT.iterdir() if (path / '__init__.py').is_file()}
    assert packages == set(SITS_ON), 'add new packages to SITS_ON and to the layers in bevdepth/__init__.py'


def test_no_module_imports_a_package_above_it():
    violations = []
    for path in sorted(PACKAGE_ROOT.rglob('*.py')):
        violations.extend(layer_violations(path))
    assert violations == [], '\n'.join(violations)


@pytest.mark.parametrize('source, expected', [
    ('from bevdepth.engine.devices import synchronize', 'imports bevdepth.engine.devices'),
    ('def f():\n    import bevdepth.models.matrixvt_det', 'imports bevdepth.models.matrixvt_det'),
    ('from bevdepth import engine', 'imports bevdepth.engine'),
    ('from ...engine import cli', 'imports bevdepth.engine'),
])
def test_an_import_from_above_is_named(tmp_path, source, expected):
    # A stand-in bevdepth/layers/heads/bad.py: layers may not import the engine or models.
    fake_root = tmp_path / 'bevdepth'
    module = fake_root / 'layers' / 'heads' / 'bad.py'
    module.parent.mkdir(parents=True)
    module.write_text(source + '\n')
    violations = layer_violations(module, root=fake_root)
    assert len(violations) == 1
    assert violations[0].startswith('bevdepth.layers.heads.bad (line ') and expected in violations[0]
