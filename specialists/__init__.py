"""specialists: generalist + specialist ensembles (Hinton, Vinyals & Dean 2015, sections 4-5).

    from specialists import SpecialistEnsemble, Student
    ens = SpecialistEnsemble.from_run("runs/quickstart")
    q = ens.predict_proba(x)
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import specialists` stays cheap for the CLI's --help
    if name in ("SpecialistEnsemble", "Student", "SingleModel"):
        from . import ensemble

        return getattr(ensemble, name)
    raise AttributeError(name)


__all__ = ["SpecialistEnsemble", "Student", "SingleModel"]
