"""ament_python packaging for coop_perception (layout follows ros2/examples)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'coop_perception'


def _files(pattern):
    return [p for p in glob(pattern) if not p.endswith('.gitkeep')]


setup(
    name=PACKAGE,
    version='0.1.0',
    package_dir={'': 'src'},
    packages=find_packages('src'),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', _files('launch/*')),
        ('share/' + PACKAGE + '/config', _files('config/*')),
        ('share/' + PACKAGE + '/models', _files('models/*')),
    ],
    install_requires=['setuptools', 'numpy', 'pyyaml', 'tqdm', 'matplotlib', 'rosbags'],
    zip_safe=True,
    maintainer='coop_perception developers',
    maintainer_email='dev@coop-perception.invalid',
    description='Asynchronous cooperative LiDAR 3D object detection with uncertainty-based trust fusion.',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'coop-perception = coop_perception.cli:main',
            'bag_player = coop_perception.ros.bag_player:main',
            'lidar_detector = coop_perception.ros.lidar_detector:main',
            'v2x_channel = coop_perception.ros.v2x_channel:main',
            'trust_fusion = coop_perception.ros.trust_fusion:main',
        ],
    },
)
