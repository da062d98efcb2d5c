from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini')
cfg = cfg['DEFAULT']

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    author=cfg['author'], author_email=cfg['author_email'], license=cfg['license'],
    packages=setuptools.find_packages(include=['agenb', 'agenb.*']),
    python_requires='>=' + cfg['min_python'],
    install_requires=cfg['requirements'].split(),
    extras_require={k: cfg.get(f'{k}_requirements', '').split() for k in ('export', 'dashboard', 'dev')},
    entry_points={'papermill.engine': ['agenb = agenb.core:IPCEngine']},
    include_package_data=True, zip_safe=False,
)
