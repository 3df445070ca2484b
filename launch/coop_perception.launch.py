"""Cooperative perception for N agents: a lidar_detector per agent (namespace /agent{k}), and in
the ego's namespace the V2X channel emulator and the trust fusion node.

    ros2 launch coop_perception coop_perception.launch.py num_agents:=5 ego_id:=1 use_sim_time:=true

Inputs: /agent{k}/lidar and /agent{k}/odom (a bag replay or live drivers). Outputs: /coop/objects,
/coop/detections, /coop/status. `coop-perception launch` starts the same nodes without the ROS CLI
(coop_perception.ros.launcher.node_specs; tests/test_launch.py keeps the two equal).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'coop_perception'


def _nodes(context):
    num_agents = int(LaunchConfiguration('num_agents').perform(context))
    ego = int(LaunchConfiguration('ego_id').perform(context))
    sim_time = LaunchConfiguration('use_sim_time').perform(context).lower() in ('true', '1')
    config = LaunchConfiguration('config').perform(context)
    if not 0 <= ego < num_agents:
        raise RuntimeError(f'ego_id {ego} is not one of the agents 0..{num_agents - 1}')
    # An empty collaborator list is the nodes' default, and `[]` has no parameter type.
    others = [k for k in range(num_agents) if k != ego]
    collaborators = {'agents': others} if others else {}
    nodes = [Node(package=PACKAGE, executable='lidar_detector', name='lidar_detector', namespace=f'agent{k}',
                  parameters=[config, {'use_sim_time': sim_time, 'publish_bev': k == ego}], output='screen')
             for k in range(num_agents)]
    nodes.append(Node(package=PACKAGE, executable='v2x_channel', name='v2x_channel', namespace=f'agent{ego}',
                      parameters=[config, {'use_sim_time': sim_time, **collaborators}], output='screen'))
    nodes.append(Node(package=PACKAGE, executable='trust_fusion', name='trust_fusion', namespace=f'agent{ego}',
                      parameters=[config, {'use_sim_time': sim_time, **collaborators}], output='screen'))
    return nodes


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('num_agents', default_value='5', description='agents 0..N-1 (agent 0: road-side unit)'),
        DeclareLaunchArgument('ego_id', default_value='1', description='the agent whose fusion runs'),
        DeclareLaunchArgument('use_sim_time', default_value='true', description='follow /clock (bag replays)'),
        DeclareLaunchArgument('config', description='parameter file of every node',
                              default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), 'config',
                                                                  'coop_perception.yaml'])),
        OpaqueFunction(function=_nodes),
    ])
