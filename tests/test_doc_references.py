"""Every `module.name` cited in docs/, README.md, BUILD.md and tlframe/ docstrings resolves
(tests/doc_references.py says what counts as a reference and how it resolves)."""

import textwrap

import doc_references


def test_every_cited_name_resolves():
  problems = doc_references.unresolved_references()
  assert not problems, "names cited in the docs that do not exist:\n" + "\n".join(problems)


def _write(root, files):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_checker_finds_stale_names_in_any_layout(tmp_path):
  _write(tmp_path, {
      "tlframe/__init__.py": '''\
          """Package: `tlframe.train.run` trains."""
          def __getattr__(name):
            if name == "Classifier":
              return 1
          ''',
      "tlframe/train/__init__.py": ("from tlframe import lazy\n"
                                    "__all__, __getattr__, __dir__ = lazy.exports({'options': ('Options',)})\n"),
      "tlframe/train/base.py": "class Base:\n  def fit(self):\n    self.best_loss = 0\n",
      "tlframe/train/trainer.py": '''\
          """Uses `base.Base.fit` and `trainer.HeadTrainer.nothing`."""
          from tlframe.train.base import Base
          class HeadTrainer(Base):
            EPOCHS = 3
          ''',
      "tlframe/train/run.py": '''\
          def run(options):
            """Reads options.l2 (a parameter, not a module) and run.missing_name."""
          ''',
      "README.md": '''\
          `tlframe.Classifier`, `trainer.HeadTrainer.fit`, `trainer.HeadTrainer.best_loss`, `tlframe.train.Options`,
          `train.trainer.HeadTrainer.EPOCHS`, metrics.json, https://x.org/train.gone, tlframe/train/base.py
          `train.HeadTrainer` and tlframe/train.py and trainer.py
          ```python
          trainer = make()
          trainer.anything
          ```
          ''',
      "docs/a.md": "`tlframe.train.run.run` and `tlframe.train.gone`\n",
  })
  problems = doc_references.unresolved_references(str(tmp_path))
  assert [p.split(":")[:3] for p in problems] == [
      ["README.md", "3", " tlframe/train.py"],
      ["README.md", "3", " train.HeadTrainer"],
      ["docs/a.md", "1", " tlframe.train.gone"],
      ["tlframe/train/run.py", "2", " run.missing_name"],
      ["tlframe/train/trainer.py", "1", " trainer.HeadTrainer.nothing"],
  ], problems
