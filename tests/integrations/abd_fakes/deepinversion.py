"""Fake NVlabs ``deepinversion.py`` and CIFAR ``get_images`` (hosts.md section 8)."""
import torch
import torch.nn as nn

from .common import trace


class DeepInversionClass:
    # the host's own signature, defaults included
    def __init__(self, bs=84, use_fp16=True, net_teacher=None, path="./gen_images/",
                 final_data_path="/gen_images_final/", parameters=dict(),  # noqa: B006
                 setting_id=0, jitter=30, criterion=None,
                 coefficients=dict(),  # noqa: B006
                 network_output_function=lambda x: x, hook_for_display=None):
        self.bs, self.net_teacher, self.criterion = bs, net_teacher, criterion
        self.network_output_function = network_output_function
        self.loss_r_feature_layers = []
        self.iterations = 3

    def get_images(self, net_student=None, targets=None):
        net_teacher = self.net_teacher
        targets = torch.arange(self.bs) % 4 if targets is None else targets
        inputs = torch.randn((self.bs, 3, 8, 8), requires_grad=True)
        optimizer = torch.optim.Adam([inputs], lr=0.1)
        for _ in range(self.iterations):
            inputs_jit = torch.roll(inputs, shifts=1, dims=3)
            optimizer.zero_grad()
            net_teacher.zero_grad()
            outputs = net_teacher(inputs_jit)
            outputs = self.network_output_function(outputs)
            loss = self.criterion(outputs, targets)
            if net_student is not None:
                loss = loss + 0.0 * net_student(inputs_jit).sum()
            trace("loss:G", loss)
            loss.backward()
            trace("backward:G")
            optimizer.step()
        return inputs.detach()

    def generate_batch(self, net_student=None, targets=None):
        return self.get_images(net_student=net_student, targets=targets)


class cifar:  # stands for the module ``cifar10/deepinversion_cifar10.py``
    @staticmethod
    def get_images(net, bs=256, epochs=1000, idx=-1, var_scale=0.00005, net_student=None,
                   prefix=None, competitive_scale=0.01, train_writer=None, global_iteration=None,
                   use_amp=False, optimizer=None, inputs=None, bn_reg_scale=0.0,
                   random_labels=False, l2_coeff=0.0):
        criterion = nn.CrossEntropyLoss()
        targets = torch.arange(bs) % 4
        for _ in range(epochs):
            optimizer.zero_grad()
            outputs = net(torch.roll(inputs, 1, 3))
            loss = criterion(outputs, targets)
            trace("loss:G", loss)
            loss.backward()
            trace("backward:G")
            optimizer.step()
        best_inputs = inputs.data.clone()
        outputs = net(best_inputs)
        return best_inputs
