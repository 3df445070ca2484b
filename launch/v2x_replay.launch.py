"""Replay a scene bag (`coop-perception to-bag`) through the cooperative perception nodes and
show it in RViz.

    ros2 launch coop_perception v2x_replay.launch.py bag:=out/scene0 num_agents:=5 ego_id:=1

Starts coop_perception.launch.py with use_sim_time, the bag player (publishing /clock; it waits
until every agent's lidar and both readers of its odometry subscribe, i.e. the nodes have loaded
their models) and, unless rviz:=false, rviz2 with config/coop_perception.rviz.
`coop-perception launch --bag BAG` starts the same without RViz and without the ROS CLI.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'coop_perception'
# Long enough for every node to import torch and load its models on a busy 2-core machine.
PLAYER_WAIT_S = '120.0'


def _player(context):
    num_agents = int(LaunchConfiguration('num_agents').perform(context))
    loop = LaunchConfiguration('loop').perform(context).lower() in ('true', '1')
    # odometry has two readers, the agent's detector and the ego's trust_fusion or v2x_channel
    topics = [t for k in range(num_agents) for t in (f'/agent{k}/lidar', f'/agent{k}/odom:2')]
    arguments = [LaunchConfiguration('bag').perform(context), '--rate', LaunchConfiguration('rate').perform(context),
                 *(['--loop'] if loop else []), '--wait-for-subscribers', PLAYER_WAIT_S, '--wait-topics', *topics]
    return [Node(package=PACKAGE, executable='bag_player', name='bag_player', arguments=arguments, output='screen')]


def generate_launch_description():
    share = FindPackageShare(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument('bag', description='rosbag2 bag of a scene (coop-perception to-bag)'),
        DeclareLaunchArgument('rate', default_value='1.0', description='replay speed factor'),
        DeclareLaunchArgument('loop', default_value='false', description='replay until interrupted'),
        DeclareLaunchArgument('num_agents', default_value='5', description='agents 0..N-1 in the bag'),
        DeclareLaunchArgument('ego_id', default_value='1', description='the agent whose fusion runs'),
        DeclareLaunchArgument('config', default_value=PathJoinSubstitution([share, 'config', 'coop_perception.yaml']),
                              description='parameter file of every node'),
        DeclareLaunchArgument('rviz', default_value='true', description='start rviz2'),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution([share, 'launch', 'coop_perception.launch.py'])),
            launch_arguments={'num_agents': LaunchConfiguration('num_agents'),
                              'ego_id': LaunchConfiguration('ego_id'),
                              'config': LaunchConfiguration('config'),
                              'use_sim_time': 'true'}.items()),
        OpaqueFunction(function=_player),
        Node(package='rviz2', executable='rviz2', name='rviz2', output='screen',
             arguments=['-d', PathJoinSubstitution([share, 'config', 'coop_perception.rviz'])],
             parameters=[{'use_sim_time': True}], condition=IfCondition(LaunchConfiguration('rviz'))),
    ])
